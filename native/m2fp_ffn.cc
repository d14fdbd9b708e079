// A transformer's feed-forward block as one op, ai.m2fp::FeedForward:
//
//   y = relu(x @ w1 + b1) @ w2 + b2      x (..., D), w1 (D, F), b1 (F), w2 (F, E), b2 (E) -> y (..., E)
//
// As separate ops (MatMul, Add, Relu, MatMul, Add) the hidden tensor (rows x F, 62 MB for the
// pixel decoder's 15120 tokens and F = 1024) is written and read back four times; here each task
// takes a block of rows and keeps its hidden rows in cache between the two products, adding the
// biases and the Relu as the products are stored. The products use a register-blocked kernel (6
// rows x 16 columns of output held in 12 vector registers; the filter matrices packed once per call
// into 16-column panels when there are many rows), which on AVX2 runs faster than ONNX Runtime's own
// GEMM for these shapes (bench/rewrites.py). F and E are multiples of 16.
//
// And a linear layer on the same kernel, ai.m2fp::Linear (the layers left after the feed-forward
// fusion: the attention's projections, the mask MLPs' last layers):
//
//   y = x @ w + b                        x (..., D), w (D, E), b (E) -> y (..., E); E a multiple of 16
//
// The graph rewrites are `m2fp_service/feedforward.py`.
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "m2fp_checked.h"
#include "m2fp_ffn.h"

namespace {

constexpr int64_t kRows = m2fp::kFfnRows;
constexpr int64_t kColumns = m2fp::kFfnColumns;
constexpr int64_t kBlock = 48;      // rows per task, at most (its hidden rows stay in cache)
constexpr int64_t kPackRows = 384;  // from this many rows on, the weights are packed first

// w (K, N) row-major -> N/16 panels, each K x 16 contiguous.
void pack(const float* w, int64_t depth, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kColumns) {
    for (int64_t k = 0; k < depth; ++k) std::memcpy(out + j * depth + k * kColumns, w + k * n + j, kColumns * sizeof(float));
  }
}

// The products for this CPU: AVX2 + FMA when it has them (and the library was built for x86-64).
// M2FP_FFN_KERNEL=generic forces the generic build (read once per process; the tests use it).
struct Choice {
  void (*ffn)(const m2fp::FfnTask&, int64_t, int64_t, float*);
  void (*linear)(const m2fp::LinearTask&, int64_t, int64_t);
  const char* name;
};
Choice choose() {
  const Choice generic{m2fp_ffn_rows_generic, m2fp_linear_rows_generic, "generic"};
  const char* forced = std::getenv("M2FP_FFN_KERNEL");
  if (forced != nullptr && std::string(forced) == "generic") return generic;
#if defined(M2FP_FFN_V3)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {m2fp_ffn_rows_v3, m2fp_linear_rows_v3, "avx2-fma"};
  }
#endif
  return generic;
}
const Choice& chosen() {
  static const Choice choice = choose();
  return choice;
}

// One call: its operands, and whether a task failed (a task runs on a pool thread, through C: no
// exception may leave it; the op reports the failure after ParallelFor).
struct Call {
  m2fp::FfnTask t;
  std::atomic<bool> failed{false};
};

void task_of(void* data, size_t index) {
  Call& call = *static_cast<Call*>(data);
  const m2fp::FfnTask& t = call.t;
  const int64_t r0 = static_cast<int64_t>(index) * t.block;
  try {
    thread_local std::vector<float> hidden;  // one block's hidden rows, per thread, kept between calls
    if (hidden.size() < static_cast<size_t>(t.block * t.f)) hidden.resize(static_cast<size_t>(t.block * t.f));
    chosen().ffn(t, r0, std::min(t.block, t.rows - r0), hidden.data());
  } catch (...) {  // std::bad_alloc from the buffer
    call.failed = true;
  }
}

void linear_task_of(void* data, size_t index) {
  const m2fp::LinearTask& t = *static_cast<const m2fp::LinearTask*>(data);
  const int64_t r0 = static_cast<int64_t>(index) * t.block;
  chosen().linear(t, r0, std::min(t.block, t.rows - r0));
}

Ort::Status fail(const char* op, const std::string& message) {
  return Ort::Status((std::string("ai.m2fp::") + op + ": " + message).c_str(), ORT_INVALID_ARGUMENT);
}

std::string dims(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

// The rows of x (..., D): the product of its leading dimensions.
int64_t rows_of(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

// w (depth, n) for a call on `rows` rows. Many rows: packed into 16-column panels once (each
// panel's rows contiguous, read by every block) in `packed`; a few (the decoder's 100 queries): read
// in place, without copying it per call (at a few hundred rows both run about as fast as ONNX
// Runtime's nodes, within the noise of calls of a few milliseconds; at 15120 rows, packed,
// 1.3-1.6x faster).
m2fp::Filter filter_of(const float* w, const float* b, int64_t depth, int64_t n, int64_t rows,
                       std::vector<float>& packed) {
  static const float kNothing = 0.0f;  // depth 0 (y = the bias): no panel is read, none offset from null
  if (depth == 0) return {&kNothing, b, 0, 0};
  if (rows < kPackRows) return {w, b, 1, n};
  packed.resize(static_cast<size_t>(depth * n));
  pack(w, depth, n, packed.data());
  return {packed.data(), b, depth, kColumns};
}

// Tasks of 6 * ceil(rows / 48) rows, at most 48: 5 to 8 tasks for 49 to 383 rows, so that a hundred
// rows still keep two threads busy. Not smaller: every task reads all of the filters, and for few
// rows that reading is most of the work.
int64_t block_of(int64_t rows) {
  return std::clamp<int64_t>((rows + 8 * kRows - 1) / (8 * kRows) * kRows, kRows, kBlock);
}

// task(data, i) for the i-th block of `block` rows, on ONNX Runtime's intra-op pool.
void for_blocks(OrtKernelContext* context, void (*task)(void*, size_t), int64_t rows, int64_t block, void* data) {
  Ort::KernelContext(context).ParallelFor(task, static_cast<size_t>((rows + block - 1) / block), 0, data);
}

Ort::Status FeedForward(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                        const Ort::Custom::Tensor<float>& w1, const Ort::Custom::Tensor<float>& b1,
                        const Ort::Custom::Tensor<float>& w2, const Ort::Custom::Tensor<float>& b2,
                        Ort::Custom::Tensor<float>& y) {
  const std::vector<int64_t> xs = x.Shape(), w1s = w1.Shape(), w2s = w2.Shape();
  const char* op = "FeedForward";
  if (xs.empty()) return fail(op, "x must have a last dimension (..., D)");
  const std::string weights = "; w1 " + dims(w1s) + ", w2 " + dims(w2s);
  if (w1s.size() != 2 || w1s[0] != xs.back()) {
    return fail(op, "w1 must be (D, F) with D = x's last dimension; x " + dims(xs) + ", w1 " + dims(w1s));
  }
  const int64_t d = w1s[0], f = w1s[1];
  if (w2s.size() != 2 || w2s[0] != f) return fail(op, "w2 must be (F, E) with F = w1's columns" + weights);
  const int64_t e = w2s[1];
  if (f % kColumns != 0 || e % kColumns != 0) return fail(op, "F and E must be multiples of 16" + weights);
  if (b1.Shape() != std::vector<int64_t>{f}) {
    return fail(op, "b1 must be (F) = (" + std::to_string(f) + "), not " + dims(b1.Shape()));
  }
  if (b2.Shape() != std::vector<int64_t>{e}) {
    return fail(op, "b2 must be (E) = (" + std::to_string(e) + "), not " + dims(b2.Shape()));
  }
  std::vector<int64_t> ys = xs;
  ys.back() = e;
  const int64_t rows = rows_of(xs);
  float* out = y.Allocate(ys);
  if (rows == 0) return Ort::Status{nullptr};
  std::vector<float> packed1, packed2;
  Call call;
  call.t = {x.Data(), out, filter_of(w1.Data(), b1.Data(), d, f, rows, packed1),
            filter_of(w2.Data(), b2.Data(), f, e, rows, packed2), rows, d, f, e, block_of(rows)};
  for_blocks(context, task_of, rows, call.t.block, &call);
  if (call.failed) return Ort::Status("ai.m2fp::FeedForward: out of memory for a block's hidden rows", ORT_FAIL);
  return Ort::Status{nullptr};
}

Ort::Status Linear(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& w,
                   const Ort::Custom::Tensor<float>& b, Ort::Custom::Tensor<float>& y) {
  const std::vector<int64_t> xs = x.Shape(), ws = w.Shape();
  const char* op = "Linear";
  if (xs.empty()) return fail(op, "x must have a last dimension (..., D)");
  if (ws.size() != 2 || ws[0] != xs.back()) {
    return fail(op, "w must be (D, E) with D = x's last dimension; x " + dims(xs) + ", w " + dims(ws));
  }
  const int64_t d = ws[0], e = ws[1];
  if (e % kColumns != 0) return fail(op, "E must be a multiple of 16; w " + dims(ws));
  if (b.Shape() != std::vector<int64_t>{e}) {
    return fail(op, "b must be (E) = (" + std::to_string(e) + "), not " + dims(b.Shape()));
  }
  std::vector<int64_t> ys = xs;
  ys.back() = e;
  const int64_t rows = rows_of(xs);
  float* out = y.Allocate(ys);
  if (rows == 0) return Ort::Status{nullptr};
  std::vector<float> packed;
  m2fp::LinearTask t{x.Data(), out, filter_of(w.Data(), b.Data(), d, e, rows, packed), rows, d, e, block_of(rows)};
  for_blocks(context, linear_task_of, rows, t.block, &t);
  return Ort::Status{nullptr};
}

Ort::Status FeedForwardChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                               const Ort::Custom::Tensor<float>& w1, const Ort::Custom::Tensor<float>& b1,
                               const Ort::Custom::Tensor<float>& w2, const Ort::Custom::Tensor<float>& b2,
                               Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("FeedForward", [&] { return FeedForward(context, x, w1, b1, w2, b2, y); });
}

Ort::Status LinearChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                          const Ort::Custom::Tensor<float>& w, const Ort::Custom::Tensor<float>& b,
                          Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("Linear", [&] { return Linear(context, x, w, b, y); });
}

}  // namespace

// Which build of the products (FeedForward's and Linear's) this process runs: "avx2-fma" or "generic" (ctypes; the tests ask).
extern "C" __attribute__((visibility("default"))) const char* m2fp_ffn_kernel(void) { return chosen().name; }

void m2fp_add_feedforward_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("FeedForward", "CPUExecutionProvider", FeedForwardChecked));
  domain.Add(keep.back().get());
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("Linear", "CPUExecutionProvider", LinearChecked));
  domain.Add(keep.back().get());
}
