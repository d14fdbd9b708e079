// ONNX's Softmax over the last axis as an op of our own, ai.m2fp::Softmax:
//
//   y = exp(x - max(x)) / sum(exp(x - max(x)))     along the last axis of x (..., N), float
//
// The decoder's masked attention adds 0 or -inf to its scores before the Softmax (every pixel a
// query's mask leaves out), and ONNX Runtime's Softmax runs 6x slower on rows like these than on
// plain ones (31 against 5 ms on 8 x 100 x 11520 scores with half of them -inf: its exp takes a
// slow path for arguments far below zero). Here exp(d) for d = x - max <= 0 is computed on 16 lanes
// at once (Cephes' expf: 2^n times a degree-6 polynomial, ~1 ulp), and d below ln(FLT_MIN) gives 0
// outright (those terms are below 1.2e-38 and the row's sum is at least 1). NaN and infinities go
// through as in the ONNX definition: a row with a NaN, a +inf or only -inf is NaN. The rewrite is
// `m2fp_service/softmax.py`.
//
// With a mask, y = Softmax(x + mask') where mask' is the mask (B, Q, L) repeated for `heads` heads:
// x (B x heads, Q, L), row (b x heads + h, q) adding the mask's row (b, q). That is what the attention computes
// as Unsqueeze(mask, 1) -> Tile(1, heads, 1, 1) -> Reshape(B x heads, Q, L) -> Add, without writing the
// repeated mask (B x heads x Q x L floats, 47 MB at the decoder's 1/8-scale level at 640x1152) and reading it
// back; the same sums, so the same results bit for bit (softmax.fuse_masks puts it in the graph).
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "m2fp_checked.h"
#include "m2fp_simd.h"
#include "m2fp_softmax.h"

namespace {

// Sixteen floats (or their bits) side by side (GCC/Clang vector extensions: one AVX-512 register,
// two AVX ones, four SSE ones, whichever the clone is built for); aligned(4): no alignment needed.
constexpr int kLanes = 16;
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));

__attribute__((always_inline)) inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
__attribute__((always_inline)) inline void store(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// exp(d) for d <= 0 (or NaN: NaN), lane by lane; 0 below ln(FLT_MIN) (and for -inf). (The same
// Cephes expf as m2fp_post.c's exp_clamped, there in scalar C, here on vectors.)
__attribute__((always_inline)) inline v16 exp_nonpositive(v16 x) {
  const v16 lowest = v16{} - 87.33654475f;  // ln(FLT_MIN): below it exp(d) is not a normal float
  const i16 under = x < lowest, nan = x != x;
  // NaN lanes go through as 0 (converting NaN to an integer is undefined behaviour) and come out NaN.
  const v16 d = nan ? v16{} : (x < lowest ? lowest : x);
  // d = n ln2 + r, |r| <= ln2 / 2: n by rounding d / ln2 (adding 1.5 * 2^23 rounds to an integer),
  // r in two steps (ln2 = 0.693359375 - 2.12194440e-4 exactly enough for float).
  const v16 magic = v16{} + 12582912.0f;
  const v16 n = (d * 1.44269504088896341f + magic) - magic;
  const v16 r = (d - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from its exponent bits: n in [-126, 0] here, so 127 + n is a normal float's exponent.
  const i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const v16 e = p * scale;
  return nan ? x : (under ? v16{} : e);
}

// Row r of x + the mask: the mask's row (r / q / heads) x q + r % q, or none (mask nullptr).
struct Rows {
  const float* x;
  const float* mask;
  int64_t n, q, heads;
  __attribute__((always_inline)) inline const float* mask_row(int64_t r) const {
    return mask + (r / q / heads * q + r % q) * n;
  }
};

// The `count` rows of x (+ the mask) from `row`, into y. A row's tail (n % 16 values) goes through a
// 16-float buffer padded with -inf (which adds nothing to the maximum or the sum).
M2FP_CLONES void softmax_rows(const Rows& in, float* y, int64_t row, int64_t count) {
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  const int64_t n = in.n, body = n / kLanes * kLanes;
  for (int64_t r = row; r < row + count; ++r) {
    const float* xr = in.x + r * n;
    const float* mr = in.mask == nullptr ? nullptr : in.mask_row(r);
    float* yr = y + r * n;
    // x + mask, 16 at a time (the same sum each time it is read).
    const auto value = [xr, mr](int64_t i) { return mr == nullptr ? load(xr + i) : load(xr + i) + load(mr + i); };
    float tail[kLanes];
    std::fill(tail, tail + kLanes, kMinusInf);
    for (int64_t i = body; i < n; ++i) tail[i - body] = mr == nullptr ? xr[i] : xr[i] + mr[i];
    // The maximum (a NaN is not taken here; it makes its own d NaN, and the row's sum NaN).
    v16 top = load(tail);
    for (int64_t i = 0; i < body; i += kLanes) {
      const v16 v = value(i);
      top = v > top ? v : top;
    }
    float m = kMinusInf;
    for (int lane = 0; lane < kLanes; ++lane) m = std::max(m, top[lane]);
    const v16 mv = v16{} + m;  // all -inf: d = -inf - -inf = NaN, as ONNX's definition gives
    // exp(x - max) into y, and its sum.
    v16 sum{};
    for (int64_t i = 0; i < body; i += kLanes) {
      const v16 e = exp_nonpositive(value(i) - mv);
      store(yr + i, e);
      sum += e;
    }
    const v16 e_tail = exp_nonpositive(load(tail) - mv);
    sum += e_tail;
    float total = 0.0f;
    for (int lane = 0; lane < kLanes; ++lane) total += sum[lane];
    // Divided by the sum.
    const v16 inverse = v16{} + 1.0f / total;
    for (int64_t i = 0; i < body; i += kLanes) store(yr + i, load(yr + i) * inverse);
    for (int64_t i = body; i < n; ++i) yr[i] = e_tail[i - body] * inverse[0];
  }
}

struct Task {
  Rows in;
  float* y;
  int64_t rows, per_task;
};

void task_of(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t row = static_cast<int64_t>(index) * t.per_task;
  softmax_rows(t.in, t.y, row, std::min(t.per_task, t.rows - row));
}

Ort::Status Softmax(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                    std::optional<const Ort::Custom::Tensor<float>*> mask,
                    std::optional<const Ort::Custom::Tensor<int64_t>*> heads, Ort::Custom::Tensor<float>& y) {
  const char* op = "Softmax";
  const std::vector<int64_t> shape = x.Shape();
  if (shape.empty()) return m2fp::fail(op, "x must have a last axis (..., N)");
  const int64_t n = shape.back();
  Rows in{x.Data(), nullptr, n, 1, 1};
  const bool masked = mask.has_value() && *mask != nullptr;
  if (masked != (heads.has_value() && *heads != nullptr)) return m2fp::fail(op, "a mask needs heads, and heads a mask");
  if (masked) {
    const std::vector<int64_t> ms = (*mask)->Shape();
    if (!m2fp::scalar((*heads)->Shape())) return m2fp::fail(op, "heads must be a scalar");
    const int64_t h = *(*heads)->Data();
    if (shape.size() != 3 || ms.size() != 3 || h < 1 || ms[1] != shape[1] || ms[2] != shape[2] ||
        shape[0] % h != 0 || shape[0] / h != ms[0]) {
      return m2fp::fail(op, "x must be (B x heads, Q, L) for a mask (B, Q, L); x " + m2fp::dims(shape) + ", mask " +
                                m2fp::dims(ms) + ", heads " + std::to_string(h));
    }
    in = Rows{x.Data(), (*mask)->Data(), n, shape[1], h};
  }
  float* out = y.Allocate(shape);
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  if (rows == 0 || n == 0) return Ort::Status{nullptr};
  // Tasks of at least 64k values (a few rows of the attention's scores, many short rows) and at
  // most 64 tasks.
  Task t{in, out, rows, std::max<int64_t>({1, (65536 + n - 1) / n, (rows + 63) / 64})};
  Ort::KernelContext(context).ParallelFor(task_of, static_cast<size_t>((rows + t.per_task - 1) / t.per_task), 0, &t);
  return Ort::Status{nullptr};
}

Ort::Status SoftmaxChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                           std::optional<const Ort::Custom::Tensor<float>*> mask,
                           std::optional<const Ort::Custom::Tensor<int64_t>*> heads, Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("Softmax", [&] { return Softmax(context, x, mask, heads, y); });
}

}  // namespace

void m2fp_add_softmax_op(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("Softmax", "CPUExecutionProvider", SoftmaxChecked));
  domain.Add(keep.back().get());
}
