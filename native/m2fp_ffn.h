// The feed-forward op of the custom-op library (m2fp_ffn.cc), added to its domain.
#pragma once

#include <onnxruntime_lite_custom_op.h>

#include <cstdint>
#include <memory>
#include <vector>

// Adds ai.m2fp::FeedForward to `domain`; `keep` owns the op object (it must outlive every session
// that uses the domain).
void m2fp_add_feedforward_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep);

namespace m2fp {

constexpr int64_t kFfnRows = 6;      // output rows per kernel call
constexpr int64_t kFfnColumns = 16;  // output columns per kernel call (two vectors of 8)

// One call's operands: x (rows, d), y (rows, e), the weights w1 (d, f) and w2 (f, e). The columns
// j..j+15 of w1 start at w1 + j * w1_step, one row of them after the other w1_ld floats apart: packed
// into 16-column panels (step d, ld 16) or as they are (step 1, ld f); w2 likewise.
struct FfnTask {
  const float* x;
  float* y;
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  int64_t rows, d, f, e, block;
  int64_t w1_step, w1_ld, w2_step, w2_ld;
};

}  // namespace m2fp

// Rows [r0, r0 + rows) of y, through `hidden` (rows x f floats): m2fp_ffn_kernel.cc built for any
// CPU, and for AVX2 + FMA (x86-64 only; the library is then built with M2FP_FFN_V3 defined).
void m2fp_ffn_rows_generic(const m2fp::FfnTask& t, int64_t r0, int64_t rows, float* hidden);
void m2fp_ffn_rows_v3(const m2fp::FfnTask& t, int64_t r0, int64_t rows, float* hidden);
