// The blocks of rows of the INT8 ops, ai.m2fp::QFeedForward and QLinear (m2fp_qffn.cc) and QConv
// (m2fp_qconv.cc), and what they are given. No ONNX Runtime header and no inline function here:
// m2fp_qffn_x86.cc is compiled for AMX and AVX-512, and an inline function of a shared header emitted there
// could be the copy the linker keeps for every caller (see m2fp_ffn_product.h).
#pragma once

#include <cstdint>

namespace m2fp {

constexpr int64_t kQffnRows = 32;    // rows of a block: two 16-row AMX tiles
constexpr int64_t kQffnDepth = 64;   // D, F and C are multiples of this (an AMX tile's 64 bytes of depth)
constexpr int64_t kQffnColumns = 32; // F, E and Cout are multiples of this (two 16-column AMX tiles)

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

// ai.m2fp::QConv (m2fp_qconv.cc): a stride-1 convolution of uint8 NHWC input with int8 weights, on blocks of
// kQffnRows output positions. A position's input row for tap t (kernel position ky, kx) lies offsets[t] bytes
// after its own row of the (padded) input: depth = taps x c, tap-major, c a multiple of 64.
//   y = saturate(round_half_even(clamp(float(acc + bias[n]) * scale[n])) + y_zero_point)
// with acc the exact int32 sum of input bytes x weights, bias the int32 bias minus the input zero point x the
// weights' sums of column n, scale = x_scale x w_scale[n] / y_scale, the clamp to [-y_zero_point,
// 255 - y_zero_point] in float: what ONNX Runtime's QLinearConv computes (MLAS's symmetric convolution).
struct QConv {
  const int8_t* tiles;     // (taps x c, cout) packed as AMX tiles (pack_tiles' layout)
  const int32_t* bias;     // (cout)
  const float* scale;      // (cout)
  const int64_t* offsets;  // (taps)
  int64_t taps, c, cout;
  int32_t y_zero_point;
};

// Which build of the INT8 blocks this process runs (m2fp_qffn.cc, chosen once; M2FP_QFFN_KERNEL caps it).
enum class Int8Kernel { kGeneric, kVnni, kAmx };
Int8Kernel int8_kernel();

}  // namespace m2fp

// Rows [r0, r0 + rows) of `c`, rows <= kQffnRows, on AMX tiles (`amx`) or with AVX-512 VNNI (m2fp_qffn_x86.cc,
// x86-64 builds where the compiler has AMX; needs c.one.tiles and c.two.tiles); m2fp_qffn.cc's plain loops
// give the same bits. On AMX tiles these functions expect the thread's tile configuration loaded
// (m2fp_qffn_amx_begin, then _end).
void m2fp_qffn_block_x86(const m2fp::QFfn& c, int64_t r0, int64_t rows, const m2fp::QScratch& s, bool amx);
// y (rows, n) = `layer` of x (rows, depth), rows <= kQffnRows (ai.m2fp::QLinear's block): `layer.tiles` needed.
void m2fp_qlinear_block_x86(const m2fp::QLayer& layer, const uint8_t* x, float* y, int64_t rows,
                            const m2fp::QScratch& s, bool amx);
// One block of a QConv: the kQffnRows positions whose input rows start at a (c bytes apart), their outputs
// (cout bytes each) written to out[i], or not where out[i] is null; `acc` kQffnRows x kQffnColumns int32.
void m2fp_qconv_block_x86(const m2fp::QConv& conv, const uint8_t* a, uint8_t* const* out, int32_t* acc, bool amx);
void m2fp_qffn_amx_begin();
void m2fp_qffn_amx_end();
