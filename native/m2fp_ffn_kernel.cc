// The register-blocked product of ai.m2fp::FeedForward and ai.m2fp::Linear (m2fp_ffn.cc):
//   out = a @ w + b   (then max(0, .) for FeedForward's hidden layer),
// for a block of rows or a chunk of columns (m2fp_ffn.cc splits the work), w packed into panels.
// Built three times (native/build.py), each build under its own name (M2FP_FFN_PRODUCT) with its own
// vector width (M2FP_FFN_LANES):
//   - the compiler's defaults, 8 lanes (m2fp_ffn_product_generic);
//   - on x86-64, -mavx2 -mfma, 8 lanes (m2fp_ffn_product_v3): tiles of 6 rows x 16 columns, 12 registers;
//   - on x86-64, -mavx512f, 16 lanes (m2fp_ffn_product_v4): tiles of 12 rows x 32 columns (two panels),
//     24 of the 32 registers, as ONNX Runtime's own AVX-512 GEMM does.
// m2fp_ffn.cc picks the widest build this CPU runs. A whole translation unit per ISA, not a target
// attribute: GCC 12 turns the broadcast below into one `vbroadcastss` from memory only when the unit
// is compiled for the ISA (under target("avx2") or target_clones it builds the vector lane by lane,
// and the kernel runs at about half the speed).
#include <cstddef>
#include <cstdint>
#include <utility>

#include "m2fp_ffn_product.h"

#ifndef M2FP_FFN_PRODUCT
#define M2FP_FFN_PRODUCT m2fp_ffn_product_generic
#endif
#ifndef M2FP_FFN_LANES
#define M2FP_FFN_LANES 8
#endif

namespace {

constexpr int kLanes = M2FP_FFN_LANES;
static_assert(kLanes == 8 || kLanes == 16, "a 16-column panel is two vectors of 8 or one of 16");
// kLanes floats side by side (GCC/Clang vector extensions); aligned(4): no alignment needed.
typedef float vec __attribute__((vector_size(4 * kLanes), aligned(4)));
constexpr int kPanel = m2fp::kFfnColumns;                 // columns of a filter panel
constexpr int kPanelVectors = kPanel / kLanes;            // vectors across a panel
constexpr int kTileRows = kLanes == 8 ? 6 : 12;           // output rows of a tile
constexpr int kTilePanels = kLanes == 8 ? 1 : 2;          // panels (of 16 columns) of a tile

__attribute__((always_inline)) inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
__attribute__((always_inline)) inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
// {s, s, ..., s}: spelled out lane by lane, which GCC builds as one broadcast from memory.
template <std::size_t... kLane>
__attribute__((always_inline)) inline vec splat(float s, std::index_sequence<kLane...>) {
  return vec{((void)kLane, s)...};
}
__attribute__((always_inline)) inline vec broadcast(const float* p) { return splat(*p, std::make_index_sequence<kLanes>()); }

// out[i][0 .. 16 * kPanels) = a[i] @ (kPanels panels) + bias (then max(0, .) when kRelu), for the
// `rows` (<= kTileRows) rows of a (row stride lda); out has row stride ldo. A panel: depth rows of 16
// columns of a filter, one after the other; the next panel follows it. The accumulators are an array
// indexed by constants only (every loop unrolled), which the compiler keeps in registers.
template <bool kRelu, int kPanels>
__attribute__((always_inline)) inline void kernel(int64_t depth, const float* __restrict a, int64_t lda,
                                                  const float* __restrict panel, const float* bias, float* out,
                                                  int64_t ldo, int64_t rows) {
  constexpr int kVectors = kPanels * kPanelVectors;  // vectors across the tile
  const float* ar[kTileRows];
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) ar[i] = a + (i < rows ? i : 0) * lda;  // rows past the end read row 0 again
  const int64_t next = depth * kPanel;  // from a panel to the next
  vec c[kTileRows][kVectors] = {};
  for (int64_t k = 0; k < depth; ++k) {
    vec b[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) b[v] = load(panel + (v / kPanelVectors) * next + (v % kPanelVectors) * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < kTileRows; ++i) {
      const vec s = broadcast(ar[i] + k);
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) c[i][v] += s * b[v];
    }
    panel += kPanel;
  }
#pragma GCC unroll 4
  for (int v = 0; v < kVectors; ++v) {
    const vec z = load(bias + v * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < kTileRows; ++i) {
      c[i][v] += z;
      if (kRelu) c[i][v] = c[i][v] < vec{} ? vec{} : c[i][v];  // max(0, v), NaN kept (as ONNX's Relu)
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) store(out + i * ldo + v * kLanes, c[i][v]);
  }
}

// out (rows x n) = a (rows x depth) @ w + its bias (then max(0, .) when kRelu), kTilePanels panels at
// a time (then one, for the last panel of an odd count), each panel kept in cache across the row tiles.
template <bool kRelu>
void product(const m2fp::Product& p) {
  for (int64_t j = 0; j < p.n;) {
    const float* panel = p.w.w + j * p.depth;
    const bool wide = kTilePanels == 2 && p.n - j >= 2 * kPanel;
    for (int64_t i = 0; i < p.rows; i += kTileRows) {
      const int64_t tile = p.rows - i < kTileRows ? p.rows - i : kTileRows;  // (no std::min: see m2fp_ffn_product.h)
      float* out = p.out + i * p.ldo + j;
      if (wide) {
        kernel<kRelu, kTilePanels>(p.depth, p.a + i * p.lda, p.lda, panel, p.w.b + j, out, p.ldo, tile);
      } else {
        kernel<kRelu, 1>(p.depth, p.a + i * p.lda, p.lda, panel, p.w.b + j, out, p.ldo, tile);
      }
    }
    j += wide ? 2 * kPanel : kPanel;
  }
}

}  // namespace

void M2FP_FFN_PRODUCT(const m2fp::Product& p) {
  if (p.relu) {
    product<true>(p);
  } else {
    product<false>(p);
  }
}
