// Group normalisation of an INT8 NHWC tensor, ai.m2fp::QGroupNorm:
//
//   y = QuantizeLinear(GroupNorm(DequantizeLinear(x)) x gamma + beta [+ residual], y_scale, y_zero_point)
//
//   x (N, H, W, C) uint8; x_scale (scalar float), x_zero_point (scalar uint8); gamma, beta (C) float;
//   epsilon (scalar float); groups (scalar int64, dividing C); y_scale (scalar float), y_zero_point (scalar
//   uint8); residual (N, C, H, W) float, optional: added before quantizing
//   -> y (N, H, W, C) uint8.
//
// The pixel decoder's GroupNorm(32, 256) at a quarter of the input's size, as ONNX Runtime runs an INT8 model's:
// a transpose of the convolution's NHWC bytes to NCHW, a reshape, DequantizeLinear, InstanceNormalization,
// a reshape back, Mul and Add (gamma, beta), Add (the upsampled coarser level, NCHW), QuantizeLinear and a
// transpose back to NHWC for the next convolution: ten passes over a 160 x 288 x 256 tensor, four of them in
// float. This reads x twice (the statistics, then the output) and the residual once. The rewrite that puts it
// in the optimised graph is m2fp_service/qgroupnorm.py.
//
// The arithmetic (tests/test_qgroupnorm.py computes the same in numpy, bit for bit):
//   - per image and group, over its C / groups channels of every pixel, the exact integer sums
//     S1 = sum(x - x_zero_point) and S2 = sum((x - x_zero_point)^2) (int64), m the count;
//   - in double: mean = x_scale S1 / m, var = x_scale^2 (S2 / m - (S1 / m)^2) (at least 0),
//     rstd = 1 / sqrt(var + epsilon); per channel a = float(x_scale rstd gamma), b = float(beta - mean rstd gamma);
//   - in float, multiplies and adds apart: v = float(x - x_zero_point) a + b [+ residual];
//   - QuantizeLinear as ONNX Runtime's: v / y_scale clamped in float to [-y_zero_point, 255 - y_zero_point]
//     (NaN -> the low end), rounded half to even, plus y_zero_point.
// The statistics are exact where ONNX Runtime sums floats, so an output byte may differ from its by one where
// v / y_scale lies next to a half.
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "m2fp_checked.h"
#if defined(__x86_64__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 warns inside its own AVX-512 headers
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#include "m2fp_qffn_product.h"
#include "m2fp_qgroupnorm.h"
#include "m2fp_simd.h"

namespace {

using m2fp::dims;
using m2fp::fail;
using m2fp::scalar;
constexpr int64_t kChunk = 1024;  // pixels per task; 65025 x 1024 < 2^32: a task's uint32 sums of squares fit
constexpr int64_t kTile = 32;     // pixels per step of the output pass: the residual's tile stays in L1

// Per channel, the sums of x and x^2 over `pixels` pixels of c channels.
M2FP_CLONES void channel_sums(const uint8_t* x, int64_t pixels, int64_t c, uint32_t* s1, uint32_t* s2) {
  std::fill(s1, s1 + c, 0u);
  std::fill(s2, s2 + c, 0u);
  for (int64_t p = 0; p < pixels; ++p) {
    const uint8_t* row = x + p * c;
    for (int64_t k = 0; k < c; ++k) {
      const uint32_t v = row[k];
      s1[k] += v;
      s2[k] += v * v;
    }
  }
}

// `pixels` output pixels (at most kTile): y = quantize(float(x - x_zp) a + b + t), t the residual transposed to
// pixel-major (or nullptr).
M2FP_CLONES void normalised(const uint8_t* x, int64_t pixels, int64_t c, const float* a, const float* b,
                            const float* t, float x_zp, float y_scale, float low, float high, int32_t y_zp,
                            uint8_t* y) {
  for (int64_t p = 0; p < pixels; ++p) {
    const uint8_t* in = x + p * c;
    uint8_t* out = y + p * c;
    const float* r = t == nullptr ? nullptr : t + p * c;
    for (int64_t k = 0; k < c; ++k) {
      float v = (static_cast<float>(in[k]) - x_zp) * a[k];
      v = v + b[k];
      if (r != nullptr) v = v + r[k];
      v = v / y_scale;
      v = v > low ? v : low;  // NaN -> low (max_ps's rule), as ONNX Runtime's QuantizeLinear
      v = v < high ? v : high;
      out[k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(v)) + y_zp);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define M2FP_QGN_AVX512 1
// 16 rows of 16 floats -> their 16 columns, in place.
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // lane L of r[4i + j]: rows 4i..4i+3 of column 4L + j
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

// `normalised` with the residual r (C rows `stride` floats apart) for `pixels` pixels (a multiple of 16) of c
// channels (a multiple of 16), 16 channels at a time (the residual's 16 rows read in sequence), 16 x 16 blocks of
// r transposed in registers. The same operations in the same order as `normalised`, 16 lanes at a time.
__attribute__((target("avx512f"))) void normalised16(const uint8_t* x, int64_t pixels, int64_t c, const float* a,
                                                     const float* b, const float* r, int64_t stride, float x_zp,
                                                     float y_scale, float low, float high, int32_t y_zp, uint8_t* y) {
  const __m512 zp = _mm512_set1_ps(x_zp), ys = _mm512_set1_ps(y_scale), lo = _mm512_set1_ps(low),
               hi = _mm512_set1_ps(high);
  const __m512i yz = _mm512_set1_epi32(y_zp);
  for (int64_t k = 0; k < c; k += 16) {
    const __m512 ak = _mm512_loadu_ps(a + k), bk = _mm512_loadu_ps(b + k);
    for (int64_t p0 = 0; p0 < pixels; p0 += 16) {
      __m512 t[16];
      for (int i = 0; i < 16; ++i) t[i] = _mm512_loadu_ps(r + (k + i) * stride + p0);
      transpose16(t);  // t[p]: channels k..k+15 of pixel p0 + p
      for (int p = 0; p < 16; ++p) {
        const int64_t at = (p0 + p) * c + k;
        const __m512i in = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + at)));
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(in), zp), ak);
        v = _mm512_add_ps(_mm512_add_ps(v, bk), t[p]);
        v = _mm512_div_ps(v, ys);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);  // max_ps(NaN, lo) = lo
        const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), yz);  // half to even (the default rounding)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + at), _mm512_cvtepi32_epi8(q));
      }
    }
  }
}
#endif

struct Plan {
  const uint8_t* x = nullptr;
  const float* residual = nullptr;  // broadcast to (N, C, H, W) by `strides` (0 along a dimension of 1), or nullptr
  uint8_t* y = nullptr;
  int64_t hw = 0, c = 0, w = 0, chunks = 0;  // chunks of kChunk pixels per image
  std::vector<int64_t> strides;
  bool whole = false;  // the residual is (N, C, H, W) itself
  std::vector<uint64_t> s1, s2;  // per task and channel (the statistics pass)
  std::vector<float> a, b;       // per image and channel (the output pass)
  float x_zp = 0, y_scale = 1, low = 0, high = 255;
  int32_t y_zp = 0;
  bool avx512 = false;  // normalised16 runs (C a multiple of 16; the CPU has AVX-512 VNNI)
};

// Task `index`: chunk index % chunks of image index / chunks, its per-channel sums.
void sums_task(void* data, size_t index) {
  Plan& p = *static_cast<Plan*>(data);
  const int64_t image = static_cast<int64_t>(index) / p.chunks, p0 = static_cast<int64_t>(index) % p.chunks * kChunk;
  const int64_t pixels = std::min(kChunk, p.hw - p0);
  thread_local std::vector<uint32_t> s1, s2;
  s1.resize(static_cast<size_t>(p.c));
  s2.resize(static_cast<size_t>(p.c));
  channel_sums(p.x + (image * p.hw + p0) * p.c, pixels, p.c, s1.data(), s2.data());
  uint64_t* t1 = p.s1.data() + index * p.c;
  uint64_t* t2 = p.s2.data() + index * p.c;
  for (int64_t k = 0; k < p.c; ++k) t1[k] = s1[static_cast<size_t>(k)], t2[k] = s2[static_cast<size_t>(k)];
}

// Task `index`: the output of chunk index % chunks of image index / chunks, kTile pixels at a time.
void output_task(void* data, size_t index) {
  const Plan& p = *static_cast<const Plan*>(data);
  const int64_t image = static_cast<int64_t>(index) / p.chunks, p0 = static_cast<int64_t>(index) % p.chunks * kChunk;
  const int64_t end = std::min(p0 + kChunk, p.hw);
  const float* a = p.a.data() + image * p.c;
  const float* b = p.b.data() + image * p.c;
  thread_local std::vector<float> tile;
  if (p.residual != nullptr) tile.resize(static_cast<size_t>(kTile * p.c));
  int64_t q = p0;
#if defined(M2FP_QGN_AVX512)
  if (p.whole && p.avx512) {  // the whole 16s of pixels; the rest below
    const int64_t pixels = (end - p0) / 16 * 16, at = (image * p.hw + p0) * p.c;
    normalised16(p.x + at, pixels, p.c, a, b, p.residual + image * p.c * p.hw + p0, p.hw, p.x_zp, p.y_scale, p.low,
                 p.high, p.y_zp, p.y + at);
    q += pixels;
  }
#endif
  for (; q < end; q += kTile) {
    const int64_t pixels = std::min(kTile, end - q);
    const float* t = nullptr;
    if (p.residual != nullptr) {  // (C, pixels) of the residual -> (pixels, C)
      const int64_t* st = p.strides.data();
      for (int64_t i = 0; i < pixels; ++i) {
        const float* r = p.residual + image * st[0] + (q + i) / p.w * st[2] + (q + i) % p.w * st[3];
        for (int64_t k = 0; k < p.c; ++k) tile[static_cast<size_t>(i * p.c + k)] = r[k * st[1]];
      }
      t = tile.data();
    }
    const int64_t at = (image * p.hw + q) * p.c;
    normalised(p.x + at, pixels, p.c, a, b, t, p.x_zp, p.y_scale, p.low, p.high, p.y_zp, p.y + at);
  }
}

Ort::Status QGroupNorm(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                       const Ort::Custom::Tensor<float>& x_scale, const Ort::Custom::Tensor<uint8_t>& x_zero_point,
                       const Ort::Custom::Tensor<float>& gamma, const Ort::Custom::Tensor<float>& beta,
                       const Ort::Custom::Tensor<float>& epsilon, const Ort::Custom::Tensor<int64_t>& groups,
                       const Ort::Custom::Tensor<float>& y_scale, const Ort::Custom::Tensor<uint8_t>& y_zero_point,
                       std::optional<const Ort::Custom::Tensor<float>*> residual, Ort::Custom::Tensor<uint8_t>& y) {
  const char* op = "QGroupNorm";
  const std::vector<int64_t> xs = x.Shape();
  if (xs.size() != 4) return fail(op, "x must be (N, H, W, C), not " + dims(xs));
  const int64_t n = xs[0], h = xs[1], w = xs[2], c = xs[3];
  for (const auto* s : {&x_scale, &epsilon, &y_scale}) {
    if (!scalar(s->Shape())) return fail(op, "x_scale, epsilon and y_scale must be scalars");
  }
  if (!scalar(x_zero_point.Shape()) || !scalar(y_zero_point.Shape()) || !scalar(groups.Shape())) {
    return fail(op, "x_zero_point, y_zero_point and groups must be scalars");
  }
  const int64_t g = *groups.Data();
  if (c <= 0 || g <= 0 || c % g != 0) {
    return fail(op, "groups must divide C; x " + dims(xs) + ", groups " + std::to_string(g));
  }
  if (gamma.Shape() != std::vector<int64_t>{c} || beta.Shape() != std::vector<int64_t>{c}) {
    return fail(op, "gamma and beta must be (C) = (" + std::to_string(c) + "), not " + dims(gamma.Shape()) +
                        " and " + dims(beta.Shape()));
  }
  // The residual broadcast to (N, C, H, W) as Add broadcasts: its strides, 0 along a dimension of 1.
  const float* r = nullptr;
  const std::vector<int64_t> full{n, c, h, w};
  std::vector<int64_t> strides(4, 0);
  if (residual.has_value() && *residual != nullptr) {
    std::vector<int64_t> rs = (*residual)->Shape();
    const std::string wrong = "residual " + dims(rs) + " must broadcast to (N, C, H, W) = " + dims(full);
    if (rs.size() > 4) return fail(op, wrong);
    rs.insert(rs.begin(), 4 - rs.size(), 1);
    int64_t stride = 1;
    for (int i = 3; i >= 0; --i) {
      if (rs[i] != full[i] && rs[i] != 1) return fail(op, wrong);
      strides[i] = rs[i] == 1 ? 0 : stride;
      stride *= rs[i];
    }
    r = (*residual)->Data();
  }
  const float s = *x_scale.Data(), ys = *y_scale.Data(), eps = *epsilon.Data();
  if (!(s > 0.0f) || !std::isfinite(s) || !(ys > 0.0f) || !std::isfinite(ys)) {
    return fail(op, "x_scale and y_scale must be positive and finite");
  }
  uint8_t* out = y.Allocate(xs);
  const int64_t hw = h * w;
  if (n == 0 || hw == 0) return Ort::Status{nullptr};

  Plan plan;
  plan.x = x.Data(), plan.residual = r, plan.y = out, plan.hw = hw, plan.c = c, plan.w = w;
  plan.chunks = (hw + kChunk - 1) / kChunk;
  plan.strides = strides, plan.whole = r != nullptr && (*residual)->Shape() == full;
  const int32_t x_zp = *x_zero_point.Data();
  plan.x_zp = static_cast<float>(x_zp), plan.y_scale = ys, plan.y_zp = *y_zero_point.Data();
  plan.low = static_cast<float>(-plan.y_zp), plan.high = static_cast<float>(255 - plan.y_zp);
  // Where the INT8 ops run AVX-512 VNNI or AMX (M2FP_QFFN_KERNEL=generic caps them to the plain loops: the tests).
  plan.avx512 = c % 16 == 0 && m2fp::int8_kernel() != m2fp::Int8Kernel::kGeneric;
  const size_t tasks = static_cast<size_t>(n * plan.chunks);
  plan.s1.resize(tasks * static_cast<size_t>(c));
  plan.s2.resize(tasks * static_cast<size_t>(c));
  Ort::KernelContext ctx(context);
  ctx.ParallelFor(sums_task, tasks, 0, &plan);

  // Per image and group, the exact sums of x - x_zp and its square from the channels' sums of x and x^2.
  plan.a.resize(static_cast<size_t>(n * c));
  plan.b.resize(static_cast<size_t>(n * c));
  const int64_t cg = c / g;
  const double m = static_cast<double>(cg * hw), scale = s;
  for (int64_t image = 0; image < n; ++image) {
    for (int64_t group = 0; group < g; ++group) {
      uint64_t sum = 0, squares = 0;
      for (int64_t t = image * plan.chunks; t < (image + 1) * plan.chunks; ++t) {
        for (int64_t k = group * cg; k < (group + 1) * cg; ++k) {
          sum += plan.s1[static_cast<size_t>(t * c + k)];
          squares += plan.s2[static_cast<size_t>(t * c + k)];
        }
      }
      // sum((x - z)^2) = sum(x^2) - 2 z sum(x) + m z^2: exact in int64 (m x 255^2 < 2^63 for any tensor here).
      const int64_t count = cg * hw, s1 = static_cast<int64_t>(sum) - count * x_zp;
      const int64_t s2 = static_cast<int64_t>(squares) - 2 * x_zp * static_cast<int64_t>(sum) + count * x_zp * x_zp;
      const double mean_q = static_cast<double>(s1) / m;
      const double var_q = std::max(0.0, static_cast<double>(s2) / m - mean_q * mean_q);
      const double mean = scale * mean_q, rstd = 1.0 / std::sqrt(scale * scale * var_q + static_cast<double>(eps));
      for (int64_t k = group * cg; k < (group + 1) * cg; ++k) {
        const double gk = gamma.Data()[k];
        plan.a[static_cast<size_t>(image * c + k)] = static_cast<float>(scale * rstd * gk);
        plan.b[static_cast<size_t>(image * c + k)] = static_cast<float>(beta.Data()[k] - mean * rstd * gk);
      }
    }
  }
  ctx.ParallelFor(output_task, tasks, 0, &plan);
  return Ort::Status{nullptr};
}

Ort::Status QGroupNormChecked(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                              const Ort::Custom::Tensor<float>& x_scale,
                              const Ort::Custom::Tensor<uint8_t>& x_zero_point, const Ort::Custom::Tensor<float>& gamma,
                              const Ort::Custom::Tensor<float>& beta, const Ort::Custom::Tensor<float>& epsilon,
                              const Ort::Custom::Tensor<int64_t>& groups, const Ort::Custom::Tensor<float>& y_scale,
                              const Ort::Custom::Tensor<uint8_t>& y_zero_point,
                              std::optional<const Ort::Custom::Tensor<float>*> residual,
                              Ort::Custom::Tensor<uint8_t>& y) {
  return m2fp::checked("QGroupNorm", [&] {
    return QGroupNorm(context, x, x_scale, x_zero_point, gamma, beta, epsilon, groups, y_scale, y_zero_point,
                      residual, y);
  });
}

}  // namespace

void m2fp_add_qgroupnorm_op(Ort::CustomOpDomain& domain,
                            std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("QGroupNorm", "CPUExecutionProvider", QGroupNormChecked));
  domain.Add(keep.back().get());
}
