// The feed-forward and linear ops of the custom-op library (m2fp_ffn.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <cstdint>
#include <memory>
#include <vector>

// Adds ai.m2fp::FeedForward and ai.m2fp::Linear to `domain`; `keep` owns the op objects (they must
// outlive every session that uses the domain).
void m2fp_add_feedforward_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);

namespace m2fp {

constexpr int64_t kFfnRows = 6;      // output rows per kernel call
constexpr int64_t kFfnColumns = 16;  // output columns per kernel call (two vectors of 8)

// A filter matrix w (depth, n) and its bias (n): the columns j..j+15 of w start at w + j * step, one
// row of them after the other ld floats apart: packed into 16-column panels (step depth, ld 16) or
// as they are (step 1, ld n).
struct Filter {
  const float* w;
  const float* b;
  int64_t step, ld;
};

// One FeedForward call's operands: x (rows, d), y (rows, e), the filters w1 (d, f) and w2 (f, e);
// tasks of `block` rows.
struct FfnTask {
  const float* x;
  float* y;
  Filter w1, w2;
  int64_t rows, d, f, e, block;
};

// One Linear call's operands: x (rows, d), y (rows, e), the filter w (d, e); tasks of `block` rows.
struct LinearTask {
  const float* x;
  float* y;
  Filter w;
  int64_t rows, d, e, block;
};

}  // namespace m2fp

// Rows [r0, r0 + rows) of y (FeedForward: through `hidden`, rows x f floats): m2fp_ffn_kernel.cc
// built for any CPU, and for AVX2 + FMA (x86-64 only; the library is then built with M2FP_FFN_V3
// defined).
void m2fp_ffn_rows_generic(const m2fp::FfnTask& t, int64_t r0, int64_t rows, float* hidden);
void m2fp_ffn_rows_v3(const m2fp::FfnTask& t, int64_t r0, int64_t rows, float* hidden);
void m2fp_linear_rows_generic(const m2fp::LinearTask& t, int64_t r0, int64_t rows);
void m2fp_linear_rows_v3(const m2fp::LinearTask& t, int64_t r0, int64_t rows);
