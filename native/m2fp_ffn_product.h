// The product of ai.m2fp::FeedForward and ai.m2fp::Linear (m2fp_ffn_kernel.cc) and what it is
// given. No ONNX Runtime header here: m2fp_ffn_kernel.cc is compiled once per instruction set, and an
// inline function of a shared header emitted there could be the copy the linker keeps for every caller
// (an AVX-512 instruction on a CPU without it).
#pragma once

#include <cstdint>

namespace m2fp {

constexpr int64_t kFfnColumns = 16;  // columns of a filter panel (two vectors of 8 or one of 16)

// A filter matrix w (depth, n) packed into 16-column panels (columns j..j+15 at w + j * depth: depth
// rows of 16 floats one after the other), and its bias (n).
struct Filter {
  const float* w;
  const float* b;
};

// out (rows, n) = a @ w + b, then max(0, .) when `relu`: a (rows, depth) with row stride lda, out
// with row stride ldo; n a multiple of 16.
struct Product {
  const float* a;
  int64_t lda, rows, depth;
  Filter w;
  int64_t n;
  float* out;
  int64_t ldo;
  bool relu;
};

}  // namespace m2fp

// The product (m2fp_ffn_kernel.cc) built for any CPU, for AVX2 + FMA and for AVX-512 (x86-64 only;
// the library is then built with M2FP_FFN_V3 and M2FP_FFN_V4 defined, each where its build succeeded).
void m2fp_ffn_product_generic(const m2fp::Product& p);
void m2fp_ffn_product_v3(const m2fp::Product& p);
void m2fp_ffn_product_v4(const m2fp::Product& p);
