// The register-blocked products of ai.m2fp::FeedForward and ai.m2fp::Linear (m2fp_ffn.cc), one
// block of rows at a time:
//   FeedForward: hidden = relu(x @ w1 + b1), y = hidden @ w2 + b2;    Linear: y = x @ w + b.
// Built twice (native/build.py): with the compiler's defaults (M2FP_FFN_ROWS = m2fp_ffn_rows_generic,
// M2FP_LINEAR_ROWS = m2fp_linear_rows_generic) and, on x86-64, with -mavx2 -mfma (the _v3 names),
// which m2fp_ffn.cc picks when the CPU has both. A whole translation unit for the ISA, not a target attribute: GCC 12 turns the broadcast
// below into one `vbroadcastss` from memory only when the unit is compiled for AVX2 (under
// target("avx2") or target_clones it builds the vector lane by lane, and the kernel runs at about
// half the speed).
#include <algorithm>
#include <cstdint>

#include "m2fp_ffn.h"

#ifndef M2FP_FFN_ROWS
#define M2FP_FFN_ROWS m2fp_ffn_rows_generic
#endif
#ifndef M2FP_LINEAR_ROWS
#define M2FP_LINEAR_ROWS m2fp_linear_rows_generic
#endif

namespace {

// Eight floats side by side (GCC/Clang vector extensions); aligned(4): no alignment needed.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kRows = m2fp::kFfnRows;        // output rows per kernel call
constexpr int64_t kColumns = m2fp::kFfnColumns;  // output columns per kernel call: two vectors

__attribute__((always_inline)) inline v8 load(const float* p) { return *reinterpret_cast<const v8*>(p); }
__attribute__((always_inline)) inline void store(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }
__attribute__((always_inline)) inline v8 broadcast(const float* p) {
  const float s = *p;
  return v8{s, s, s, s, s, s, s, s};
}

// out[i][0..16) = a[i] @ panel + bias (then max(0, .) when kRelu), for the `rows` (<= 6) rows of a
// (row stride lda); panel: K rows of 16 columns of a filter, ldb floats apart; out has row stride ldo.
template <bool kRelu>
__attribute__((always_inline)) inline void kernel(int64_t depth, const float* __restrict a, int64_t lda,
                                                  const float* __restrict panel, int64_t ldb, const float* bias,
                                                  float* out, int64_t ldo, int64_t rows) {
  const float* a0 = a;  // rows past the end read row 0 again; only `rows` rows are stored
  const float* a1 = rows > 1 ? a + lda : a;
  const float* a2 = rows > 2 ? a + 2 * lda : a;
  const float* a3 = rows > 3 ? a + 3 * lda : a;
  const float* a4 = rows > 4 ? a + 4 * lda : a;
  const float* a5 = rows > 5 ? a + 5 * lda : a;
  v8 c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{}, c40{}, c41{}, c50{}, c51{};
  for (int64_t k = 0; k < depth; ++k) {
    const v8 b0 = load(panel), b1 = load(panel + 8);
    v8 s = broadcast(a0 + k);
    c00 += s * b0;
    c01 += s * b1;
    s = broadcast(a1 + k);
    c10 += s * b0;
    c11 += s * b1;
    s = broadcast(a2 + k);
    c20 += s * b0;
    c21 += s * b1;
    s = broadcast(a3 + k);
    c30 += s * b0;
    c31 += s * b1;
    s = broadcast(a4 + k);
    c40 += s * b0;
    c41 += s * b1;
    s = broadcast(a5 + k);
    c50 += s * b0;
    c51 += s * b1;
    panel += ldb;
  }
  const v8 z0 = load(bias), z1 = load(bias + 8);
  v8 r[12] = {c00 + z0, c01 + z1, c10 + z0, c11 + z1, c20 + z0, c21 + z1,
              c30 + z0, c31 + z1, c40 + z0, c41 + z1, c50 + z0, c51 + z1};
  if (kRelu) {  // max(0, v), NaN kept (as ONNX's Relu)
    const v8 zero{};
    for (v8& v : r) v = v < zero ? zero : v;
  }
  for (int64_t i = 0; i < rows; ++i) {
    store(out + i * ldo, r[2 * i]);
    store(out + i * ldo + 8, r[2 * i + 1]);
  }
}

// out (rows x n, row stride ldo) = a (rows x depth, row stride lda) @ w + its bias (then max(0, .)
// when kRelu), 16 columns at a time.
template <bool kRelu>
void product(const float* a, int64_t lda, int64_t depth, const m2fp::Filter& w, int64_t n, float* out, int64_t ldo,
             int64_t rows) {
  for (int64_t j = 0; j < n; j += kColumns) {
    const float* panel = w.w + j * w.step;
    for (int64_t i = 0; i < rows; i += kRows) {
      kernel<kRelu>(depth, a + i * lda, lda, panel, w.ld, w.b + j, out + i * ldo + j, ldo, std::min(kRows, rows - i));
    }
  }
}

}  // namespace

void M2FP_FFN_ROWS(const m2fp::FfnTask& t, int64_t r0, int64_t rows, float* hidden) {
  product<true>(t.x + r0 * t.d, t.d, t.d, t.w1, t.f, hidden, t.f, rows);  // hidden = relu(x @ w1 + b1)
  product<false>(hidden, t.f, t.f, t.w2, t.e, t.y + r0 * t.e, t.e, rows);  // y = hidden @ w2 + b2
}

void M2FP_LINEAR_ROWS(const m2fp::LinearTask& t, int64_t r0, int64_t rows) {
  product<false>(t.x + r0 * t.d, t.d, t.d, t.w, t.e, t.y + r0 * t.e, t.e, rows);
}
