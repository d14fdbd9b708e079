// The blocks of rows of ai.m2fp::QFeedForward and ai.m2fp::QLinear (m2fp_qffn.cc), and what they are
// given. No ONNX Runtime header and no inline function here: m2fp_qffn_x86.cc is compiled for AMX and
// AVX-512, and an inline function of a shared header emitted there could be the copy the linker keeps
// for every caller (see m2fp_ffn_product.h).
#pragma once

#include <cstdint>

namespace m2fp {

constexpr int64_t kQffnRows = 32;    // rows of a block: two 16-row AMX tiles
constexpr int64_t kQffnDepth = 64;   // D and F are multiples of this (an AMX tile's 64 bytes of depth)
constexpr int64_t kQffnColumns = 32; // F and E are multiples of this (two 16-column AMX tiles)

// One quantized layer, acc = x_q @ w_q in int32, then
//   y = float(acc - corr[n]) * mult[n] + bias[n]
// with corr[n] = the input's zero point x the sum of w's column n, and mult[n] = input scale x w's
// scale of column n: what ONNX Runtime's MatMulIntegerToFloat and the Add after it compute.
struct QLayer {
  const int8_t* w;       // (depth, n) row-major, as given
  const int8_t* tiles;   // the same packed as AMX tiles, also read by the VNNI build (pack_tiles), or null
  const int32_t* corr;   // (n)
  const float* mult;     // (n)
  const float* bias;     // (n)
  int64_t depth, n;
};

// y (rows, e) = layer two of (quantize(relu(layer one of x))): the hidden layer quantized to uint8 with
// h_scale and h_zero_point as QuantizeLinear does (round half to even, saturate).
struct QFfn {
  const uint8_t* x;  // (rows, d)
  float* y;          // (rows, e)
  int64_t rows;
  QLayer one, two;
  float h_scale;
  int32_t h_zero_point;
};

// Scratch for one block, per thread: `hidden` kQffnRows x F bytes, `acc` kQffnRows x kQffnColumns int32,
// `pad` kQffnRows x D bytes (a last block of fewer rows is copied there, the rest zero).
struct QScratch {
  uint8_t* hidden;
  int32_t* acc;
  uint8_t* pad;
};

}  // namespace m2fp

// Rows [r0, r0 + rows) of `c`, rows <= kQffnRows, on AMX tiles (`amx`) or with AVX-512 VNNI (m2fp_qffn_x86.cc,
// x86-64 builds where the compiler has AMX; needs c.one.tiles and c.two.tiles); m2fp_qffn.cc's plain loops
// give the same bits. On AMX tiles both functions expect the thread's tile configuration loaded
// (m2fp_qffn_amx_begin, then _end).
void m2fp_qffn_block_x86(const m2fp::QFfn& c, int64_t r0, int64_t rows, const m2fp::QScratch& s, bool amx);
// y (rows, n) = `layer` of x (rows, depth), rows <= kQffnRows (ai.m2fp::QLinear's block): `layer.tiles` needed.
void m2fp_qlinear_block_x86(const m2fp::QLayer& layer, const uint8_t* x, float* y, int64_t rows,
                            const m2fp::QScratch& s, bool amx);
void m2fp_qffn_amx_begin();
void m2fp_qffn_amx_end();
