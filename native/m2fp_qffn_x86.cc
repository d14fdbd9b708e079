// The INT8 ops' products on AMX tiles or with AVX-512 VNNI (built only on x86-64, with -mamx-tile -mamx-int8
// -mavx512vnni and AVX-512 for the epilogues): the blocks of 32 rows of ai.m2fp::QFeedForward and QLinear
// (m2fp_qffn.cc) and of 32 output positions of ai.m2fp::QConv (m2fp_qconv.cc). Those files call the AMX
// products only where the CPU has AMX-INT8 and the kernel lets this process use the tile data, the VNNI ones
// where the CPU has AVX-512 VNNI. Each product runs in steps of 32 output columns into a 32 x 32 block of
// int32 sums, its depth read as taps (one for the feed-forward ops; one per kernel position for a
// convolution, the rows shifted there), which the epilogue then turns into outputs 16 columns at a time:
// - AMX: four 16 x 16 accumulator tiles (rows 0-15 and 16-31 by columns 0-15 and 16-31) take `tdpbusd` of
//   two 16 x 64-byte row tiles of the input and two 64 x 16 weight tiles;
// - VNNI: 8 rows at a time, 16 zmm accumulators (8 rows x 2 x 16 columns) take `vpdpbusd` of each row's 4
//   bytes of depth broadcast and the weights' 4 bytes of depth for 16 columns: one 64-byte row of the same
//   packed tiles (pack_tiles in m2fp_qffn.cc, qconv.pack for the convolutions).
// Multiplies and adds stay separate (-ffp-contract=off), so the bits are the plain loops' (m2fp_qffn.cc,
// m2fp_qconv.cc) and ONNX Runtime's.
#include <immintrin.h>

#include <cstdint>
#include <cstring>


#include "m2fp_qffn_product.h"

namespace {

using m2fp::kQffnColumns;
using m2fp::kQffnDepth;
using m2fp::kQffnRows;

struct TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// acc (kQffnRows x kQffnColumns int32) = the rows of a (kQffnRows rows, lda bytes apart) @ the weight tiles of
// output columns [j, j + 32), the depth read as `taps` runs of `chunks` x 64 bytes, tap t's at a + offsets[t]
// (a product: one tap at offset 0; a convolution: one per kernel position, the rows shifted there).
inline void product_amx(const uint8_t* a, int64_t lda, const int64_t* offsets, int64_t taps, int64_t chunks,
                        const int8_t* tiles, int64_t j, int32_t* acc) {
  const int64_t steps = taps * chunks;
  const int8_t* left = tiles + (j / 16) * steps * 1024;  // columns j .. j + 15: `steps` tiles of 1 KB
  const int8_t* right = left + steps * 1024;              // columns j + 16 .. j + 31
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t t = 0, k = 0; t < taps; ++t) {
    const uint8_t* at = a + offsets[t];
    for (int64_t c = 0; c < chunks; ++c, ++k) {
      _tile_loadd(0, at + c * kQffnDepth, lda);
      _tile_loadd(1, at + 16 * lda + c * kQffnDepth, lda);
      _tile_loadd(2, left + k * 1024, 64);
      _tile_loadd(3, right + k * 1024, 64);
      _tile_dpbusd(4, 0, 2);
      _tile_dpbusd(5, 0, 3);
      _tile_dpbusd(6, 1, 2);
      _tile_dpbusd(7, 1, 3);
    }
  }
  constexpr int64_t ld = kQffnColumns * sizeof(int32_t);
  _tile_stored(4, acc, ld);
  _tile_stored(5, acc + 16, ld);
  _tile_stored(6, acc + 16 * kQffnColumns, ld);
  _tile_stored(7, acc + 16 * kQffnColumns + 16, ld);
}

// The same block with AVX-512 VNNI (the weights' tile rows, 64 bytes each, one after the other per 16 columns).
inline void product_vnni(const uint8_t* a, int64_t lda, const int64_t* offsets, int64_t taps, int64_t chunks,
                         const int8_t* tiles, int64_t j, int32_t* acc) {
  const int64_t groups = chunks * kQffnDepth / 4;          // per tap: 4 bytes of depth per int32 lane
  const int8_t* left = tiles + (j / 16) * taps * groups * 64;  // columns j .. j + 15: a row of 64 bytes per group
  const int8_t* right = left + taps * groups * 64;            // columns j + 16 .. j + 31
  for (int64_t r = 0; r < kQffnRows; r += 8) {
    __m512i c[8][2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) c[i][0] = c[i][1] = _mm512_setzero_si512();
    for (int64_t t = 0; t < taps; ++t) {
      const uint8_t* at = a + offsets[t] + r * lda;
      const int8_t *lt = left + t * groups * 64, *rt = right + t * groups * 64;
      for (int64_t g = 0; g < groups; ++g) {
        const __m512i b0 = _mm512_loadu_si512(lt + g * 64), b1 = _mm512_loadu_si512(rt + g * 64);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          int32_t word;  // the row's 4 bytes of depth
          std::memcpy(&word, at + i * lda + g * 4, sizeof word);
          const __m512i x = _mm512_set1_epi32(word);
          c[i][0] = _mm512_dpbusd_epi32(c[i][0], x, b0);
          c[i][1] = _mm512_dpbusd_epi32(c[i][1], x, b1);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_si512(acc + (r + i) * kQffnColumns, c[i][0]);
      _mm512_storeu_si512(acc + (r + i) * kQffnColumns + 16, c[i][1]);
    }
  }
}

using Product = void (*)(const uint8_t*, int64_t, const int64_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*);

constexpr int64_t kAt[1] = {0};  // a product's one tap

// float(acc - corr) * mult + bias for 16 columns.
inline __m512 dequantized(const int32_t* acc, const m2fp::QLayer& layer, int64_t j) {
  const __m512i v = _mm512_sub_epi32(_mm512_loadu_si512(acc), _mm512_loadu_si512(layer.corr + j));
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(layer.mult + j)),
                       _mm512_loadu_ps(layer.bias + j));
}

}  // namespace

// Palette 1, tiles 0-7 all 16 rows of 64 bytes. A constant: GCC 12 drops stores to a local
// configuration before `ldtilecfg`, as if the instruction did not read them.
alignas(64) const TileConfig kTiles = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

void m2fp_qffn_amx_begin() { _tile_loadconfig(&kTiles); }

void m2fp_qffn_amx_end() { _tile_release(); }

void m2fp_qffn_block_x86(const m2fp::QFfn& c, int64_t r0, int64_t rows, const m2fp::QScratch& s, bool amx) {
  const Product product = amx ? product_amx : product_vnni;
  const int64_t d = c.one.depth, f = c.one.n, e = c.two.n;
  const uint8_t* x = c.x + r0 * d;
  if (rows < kQffnRows) {  // a last, short block: from a copy padded with zero rows
    std::memset(s.pad, 0, static_cast<size_t>(kQffnRows * d));
    std::memcpy(s.pad, x, static_cast<size_t>(rows * d));
    x = s.pad;
  }
  // The hidden layer: relu, then QuantizeLinear's x / scale rounded half to even, plus the zero point,
  // saturated to [0, 255] (clamped in float first, as ONNX Runtime's MLAS does). NaN as there: Relu keeps it
  // (max(0, NaN) with NaN second), the clamp's max(NaN, low) gives low: the hidden byte is 0.
  const __m512 zero = _mm512_setzero_ps(), scale = _mm512_set1_ps(c.h_scale);
  const __m512 low = _mm512_set1_ps(static_cast<float>(-c.h_zero_point));
  const __m512 high = _mm512_set1_ps(static_cast<float>(255 - c.h_zero_point));
  const __m512i zero_point = _mm512_set1_epi32(c.h_zero_point);
  for (int64_t j = 0; j < f; j += kQffnColumns) {
    product(x, d, kAt, 1, d / kQffnDepth, c.one.tiles, j, s.acc);
    for (int64_t i = 0; i < kQffnRows; ++i) {
      for (int64_t h = 0; h < kQffnColumns; h += 16) {
        __m512 v = _mm512_max_ps(zero, dequantized(s.acc + i * kQffnColumns + h, c.one, j + h));
        v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, scale), low), high);
        const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero_point);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(s.hidden + i * f + j + h), _mm512_cvtusepi32_epi8(q));
      }
    }
  }
  float* y = c.y + r0 * e;
  for (int64_t j = 0; j < e; j += kQffnColumns) {
    product(s.hidden, f, kAt, 1, f / kQffnDepth, c.two.tiles, j, s.acc);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t h = 0; h < kQffnColumns; h += 16) {
        _mm512_storeu_ps(y + i * e + j + h, dequantized(s.acc + i * kQffnColumns + h, c.two, j + h));
      }
    }
  }
}

void m2fp_qlinear_block_x86(const m2fp::QLayer& layer, const uint8_t* x, float* y, int64_t rows,
                            const m2fp::QScratch& s, bool amx) {
  const Product product = amx ? product_amx : product_vnni;
  const int64_t d = layer.depth, e = layer.n;
  if (rows < kQffnRows) {
    std::memset(s.pad, 0, static_cast<size_t>(kQffnRows * d));
    std::memcpy(s.pad, x, static_cast<size_t>(rows * d));
    x = s.pad;
  }
  for (int64_t j = 0; j < e; j += kQffnColumns) {
    product(x, d, kAt, 1, d / kQffnDepth, layer.tiles, j, s.acc);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t h = 0; h < kQffnColumns; h += 16) {
        _mm512_storeu_ps(y + i * e + j + h, dequantized(s.acc + i * kQffnColumns + h, layer, j + h));
      }
    }
  }
}

void m2fp_qconv_block_x86(const m2fp::QConv& conv, const uint8_t* a, uint8_t* const* out, int32_t* acc, bool amx) {
  const Product product = amx ? product_amx : product_vnni;
  const __m512 low = _mm512_set1_ps(static_cast<float>(-conv.y_zero_point));
  const __m512 high = _mm512_set1_ps(static_cast<float>(255 - conv.y_zero_point));
  const __m512i zero_point = _mm512_set1_epi32(conv.y_zero_point);
  for (int64_t j = 0; j < conv.cout; j += kQffnColumns) {
    product(a, conv.c, conv.offsets, conv.taps, conv.c / kQffnDepth, conv.tiles, j, acc);
    // The block's 32 columns of bias and scale in registers (a store through uint8_t* could alias them).
    const __m512i bias[2] = {_mm512_loadu_si512(conv.bias + j), _mm512_loadu_si512(conv.bias + j + 16)};
    const __m512 scale[2] = {_mm512_loadu_ps(conv.scale + j), _mm512_loadu_ps(conv.scale + j + 16)};
    for (int64_t i = 0; i < kQffnRows; ++i) {
      uint8_t* y = out[i];
      if (y == nullptr) continue;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i sum = _mm512_add_epi32(_mm512_loadu_si512(acc + i * kQffnColumns + 16 * h), bias[h]);
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale[h]);
        v = _mm512_min_ps(_mm512_max_ps(v, low), high);
        const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero_point);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j + 16 * h), _mm512_cvtusepi32_epi8(q));
      }
    }
  }
}
