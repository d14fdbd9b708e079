// A transformer's feed-forward block as one op, ai.m2fp::FeedForward:
//
//   y = relu(x @ w1 + b1) @ w2 + b2      x (..., D), w1 (D, F), b1 (F), w2 (F, E), b2 (E) -> y (..., E)
//
// As separate ops (MatMul, Add, Relu, MatMul, Add) the hidden tensor (rows x F, 62 MB for the
// pixel decoder's 15120 tokens and F = 1024) is written and read back four times; here each task
// takes a block of rows and keeps its hidden rows in cache between the two products, adding the
// biases and the Relu as the products are stored. The products use a register-blocked kernel
// (m2fp_ffn_kernel.cc: on AVX-512, 12 rows x 32 columns of output in 24 registers; on AVX2, 6 x 16 in
// 12) on the filter matrices packed into 16-column panels, which runs faster than ONNX Runtime's own
// GEMM for these shapes (bench/rewrites.py). F and E are multiples of 16. Few rows (the decoder's
// 100 queries) go one layer at a time, split by columns instead.
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

constexpr int64_t kColumns = m2fp::kFfnColumns;
constexpr int64_t kBlock = 48;      // rows of a row block: whole tiles of every build (6 or 12 rows)
constexpr int64_t kManyRows = 384;  // from this many rows on, by row blocks (fewer: by column chunks)

// `columns` columns of w (depth rows, ldw floats apart) -> columns / 16 panels, each depth x 16
// contiguous.
void pack(const float* w, int64_t ldw, int64_t depth, int64_t columns, float* out) {
  for (int64_t j = 0; j < columns; j += kColumns) {
    for (int64_t k = 0; k < depth; ++k) std::memcpy(out + j * depth + k * kColumns, w + k * ldw + j, kColumns * sizeof(float));
  }
}

// The product for this CPU: the widest build it runs (AVX-512, else AVX2 + FMA, else generic; the
// first two only where the library was built for x86-64). M2FP_FFN_KERNEL=generic or =avx2-fma caps
// the choice at that build (read once per process; the tests use it to run every build).
struct Choice {
  void (*product)(const m2fp::Product&);
  const char* name;
};
Choice choose() {
  const Choice generic{m2fp_ffn_product_generic, "generic"};
  const char* env = std::getenv("M2FP_FFN_KERNEL");
  const std::string cap = env == nullptr ? "" : env;
  if (cap == "generic") return generic;
#if defined(M2FP_FFN_V3) || defined(M2FP_FFN_V4)
  __builtin_cpu_init();
#endif
#if defined(M2FP_FFN_V4)
  if (cap != "avx2-fma" && __builtin_cpu_supports("avx512f")) return {m2fp_ffn_product_v4, "avx512"};
#endif
#if defined(M2FP_FFN_V3)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {m2fp_ffn_product_v3, "avx2-fma"};
#endif
  return generic;
}
const Choice& chosen() {
  static const Choice choice = choose();
  return choice;
}

// One layer of a call: y = x @ w + b (then max(0, .) when relu); w (depth, n) row-major, as given.
struct Layer {
  const float* w;
  const float* b;
  int64_t depth, n;
  bool relu;
};

// `layer`'s filter, its columns [j0, j0 + columns) packed into `panels` (zero depth: nothing to pack,
// and no panel is read; none is offset from a null pointer either).
m2fp::Filter packed(const Layer& layer, int64_t j0, int64_t columns, std::vector<float>& panels) {
  static const float kNothing = 0.0f;
  if (layer.depth == 0) return {&kNothing, layer.b + j0};
  if (panels.size() < static_cast<size_t>(layer.depth * columns)) panels.resize(static_cast<size_t>(layer.depth * columns));
  pack(layer.w + j0, layer.n, layer.depth, columns, panels.data());
  return {panels.data(), layer.b + j0};
}

// Many rows: task i takes rows [i * kBlock, (i + 1) * kBlock) through the call's one or two layers
// (filters packed once per call, read by every task), a FeedForward's hidden rows in a per-thread
// buffer that stays in cache between its two products.
// (A task runs on a pool thread, through C: no exception may leave it; the op reports a failure
// after ParallelFor.)
struct RowBlocks {
  const float* x;
  float* y;
  int64_t rows, d;
  bool ffn;  // false: one layer (Linear), x @ w1 -> y (rows, e)
  m2fp::Filter w1, w2;
  int64_t f, e;
  std::atomic<bool> failed{false};
};

void row_block(void* data, size_t index) {
  RowBlocks& c = *static_cast<RowBlocks*>(data);
  const int64_t r0 = static_cast<int64_t>(index) * kBlock, rows = std::min(kBlock, c.rows - r0);
  const float* x = c.x + r0 * c.d;
  float* y = c.y + r0 * c.e;
  if (!c.ffn) {
    chosen().product({x, c.d, rows, c.d, c.w1, c.e, y, c.e, false});
    return;
  }
  try {
    thread_local std::vector<float> hidden;  // one block's hidden rows, per thread, kept between calls
    if (hidden.size() < static_cast<size_t>(kBlock * c.f)) hidden.resize(static_cast<size_t>(kBlock * c.f));
    chosen().product({x, c.d, rows, c.d, c.w1, c.f, hidden.data(), c.f, true});
    chosen().product({hidden.data(), c.f, rows, c.f, c.w2, c.e, y, c.e, false});
  } catch (...) {  // std::bad_alloc from the buffer
    c.failed = true;
  }
}

// Few rows: task i takes the columns [i * chunk, (i + 1) * chunk) of one layer, for every row, and
// reads only those columns of the filter (split by rows, every task would read all of it), packed
// into panels first (read in place, a panel's rows lie n floats apart: for n a multiple of 1024 they
// fall into the same few cache sets).
struct ColumnChunks {
  const float* x;
  int64_t rows;
  Layer layer;
  float* y;
  int64_t chunk;
  std::atomic<bool> failed{false};
};

void column_chunk(void* data, size_t index) {
  ColumnChunks& c = *static_cast<ColumnChunks*>(data);
  const int64_t j0 = static_cast<int64_t>(index) * c.chunk, columns = std::min(c.chunk, c.layer.n - j0);
  const int64_t depth = c.layer.depth;
  try {
    thread_local std::vector<float> panels;  // per thread, kept between calls
    chosen().product({c.x, depth, c.rows, depth, packed(c.layer, j0, columns, panels), columns, c.y + j0, c.layer.n,
                      c.layer.relu});
  } catch (...) {  // std::bad_alloc from the buffer
    c.failed = true;
  }
}

// task(data, i) for i in [0, count), on ONNX Runtime's intra-op pool.
void parallel(OrtKernelContext* context, void (*task)(void*, size_t), int64_t count, void* data) {
  if (count > 0) Ort::KernelContext(context).ParallelFor(task, static_cast<size_t>(count), 0, data);
}

// y = x @ w + b (then relu) for few rows, in column chunks of 32 * ceil(n / 256): about 8 tasks.
bool by_columns(OrtKernelContext* context, const float* x, int64_t rows, const Layer& layer, float* y) {
  ColumnChunks c{x, rows, layer, y,
                 std::max<int64_t>(2 * kColumns, (layer.n + 16 * kColumns - 1) / (16 * kColumns) * 2 * kColumns)};
  parallel(context, column_chunk, (layer.n + c.chunk - 1) / c.chunk, &c);
  return !c.failed;
}

// y (rows, E) from x (rows, D) through `first` and, for FeedForward, `second` (null for Linear).
// Many rows go by row blocks; few (the decoder's 100 queries) one layer after the other by column
// chunks, a FeedForward's hidden rows (rows x F) in between. False: out of memory.
bool run(OrtKernelContext* context, const float* x, int64_t rows, const Layer& first, const Layer* second, float* y) {
  if (rows < kManyRows) {
    if (second == nullptr) return by_columns(context, x, rows, first, y);
    std::vector<float> hidden(static_cast<size_t>(rows * first.n));
    return by_columns(context, x, rows, first, hidden.data()) && by_columns(context, hidden.data(), rows, *second, y);
  }
  std::vector<float> panels1, panels2;
  const m2fp::Filter w2 = second != nullptr ? packed(*second, 0, second->n, panels2) : m2fp::Filter{};
  RowBlocks c{x, y, rows, first.depth, second != nullptr, packed(first, 0, first.n, panels1), w2, first.n,
              second != nullptr ? second->n : first.n};
  parallel(context, row_block, (rows + kBlock - 1) / kBlock, &c);
  return !c.failed;
}

using m2fp::dims;
using m2fp::fail;
using m2fp::rows_of;

Ort::Status FeedForward(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                        const Ort::Custom::Tensor<float>& w1, const Ort::Custom::Tensor<float>& b1,
                        const Ort::Custom::Tensor<float>& w2, const Ort::Custom::Tensor<float>& b2,
                        Ort::Custom::Tensor<float>& y) {
  const std::vector<int64_t> xs = x.Shape(), w1s = w1.Shape(), w2s = w2.Shape();
  const char* op = "FeedForward";
  int64_t d = 0, f = 0, e = 0;
  if (const std::string wrong = m2fp::block_shapes(xs, w1s, w2s, d, f, e); !wrong.empty()) return fail(op, wrong);
  const std::string weights = "; w1 " + dims(w1s) + ", w2 " + dims(w2s);
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
  const Layer first{w1.Data(), b1.Data(), d, f, true}, second{w2.Data(), b2.Data(), f, e, false};
  if (!run(context, x.Data(), rows, first, &second, out)) {
    return Ort::Status("ai.m2fp::FeedForward: out of memory for its buffers", ORT_FAIL);
  }
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
  if (!run(context, x.Data(), rows, {w.Data(), b.Data(), d, e, false}, nullptr, out)) {
    return Ort::Status("ai.m2fp::Linear: out of memory for its buffers", ORT_FAIL);
  }
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

// Which build of the product (FeedForward's and Linear's) this process runs: "avx512", "avx2-fma" or "generic"
// (ctypes; the tests ask).
extern "C" __attribute__((visibility("default"))) const char* m2fp_ffn_kernel(void) { return chosen().name; }

void m2fp_add_feedforward_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("FeedForward", "CPUExecutionProvider", FeedForwardChecked));
  domain.Add(keep.back().get());
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("Linear", "CPUExecutionProvider", LinearChecked));
  domain.Add(keep.back().get());
}
