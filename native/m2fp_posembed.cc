// DETR's sine position embedding of a feature map as one op, ai.m2fp::SinePositionEmbedding:
//
//   pos = SinePositionEmbedding(x, params)    x (N, C, H, W) float, read for its shape only;
//   params (5) float = (F, temperature, scale, normalize, channels_last) -> pos (N, 2F, H, W), or
//   (N, H, W, 2F) channels last (where ONNX Runtime moved the module's last transpose into the next one)
//
// as Mask2Former's PositionEmbeddingSine(F, temperature, normalize, scale) computes it without a mask:
// ye = y + 1, xe = x + 1 (then, normalised, ye / (H + 1e-6) * scale, xe / (W + 1e-6) * scale, in float);
// d_k = temperature ^ (2 floor(k / 2) / F); channel k < F of the y half is sin(ye / d_k) for even k and
// cos(ye / d_k) for odd k, and the x half the same of xe. Each value depends on one coordinate, so the op
// computes F (H + W) sines and cosines (in double, rounded once) into one table and fills the output, where
// the exported graph's ~100 nodes compute and move the whole (N, H, W, 2F) tensor several times.
// The graph rewrite is `m2fp_service/posembed.py`.
#include <onnxruntime_lite_custom_op.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "m2fp_checked.h"
#include "m2fp_posembed.h"

namespace {

using m2fp::dims;
using m2fp::fail;

// Channels first: the output's planes, plane p of image n is channel p % 2F. Channels last: its rows, row r of
// image n is y = r % H. `table` is (H + W, F): row y's F values of the y half, then column x's of the x half.
struct Fill {
  const float* table;
  float* out;
  int64_t feats, h, w;
};

void fill_planes(void* data, size_t index) {
  const Fill& f = *static_cast<const Fill*>(data);
  const int64_t c = static_cast<int64_t>(index) % (2 * f.feats);
  float* plane = f.out + static_cast<int64_t>(index) * f.h * f.w;
  if (c < f.feats) {  // one value per row
    for (int64_t y = 0; y < f.h; ++y) {
      const float v = f.table[y * f.feats + c];
      for (int64_t x = 0; x < f.w; ++x) plane[y * f.w + x] = v;
    }
  } else {  // one value per column: every row the same
    const float* columns = f.table + f.h * f.feats + (c - f.feats);
    for (int64_t x = 0; x < f.w; ++x) plane[x] = columns[x * f.feats];
    for (int64_t y = 1; y < f.h; ++y) std::memcpy(plane + y * f.w, plane, static_cast<size_t>(f.w) * sizeof(float));
  }
}

void fill_rows(void* data, size_t index) {
  const Fill& f = *static_cast<const Fill*>(data);
  const int64_t y = static_cast<int64_t>(index) % f.h;
  float* row = f.out + static_cast<int64_t>(index) * f.w * 2 * f.feats;
  const size_t half = static_cast<size_t>(f.feats) * sizeof(float);
  for (int64_t x = 0; x < f.w; ++x) {
    std::memcpy(row + x * 2 * f.feats, f.table + y * f.feats, half);
    std::memcpy(row + x * 2 * f.feats + f.feats, f.table + (f.h + x) * f.feats, half);
  }
}

// sin or cos (k even or odd) of (i + 1) [/ (n + eps) * scale] / d_k for i < n, as float, into out[i * feats].
void axis_values(int64_t n, int64_t k, int64_t feats, float temperature, float scale, bool normalize, float* out) {
  const float exponent = static_cast<float>(2 * (k / 2)) / static_cast<float>(feats);
  const float d = std::pow(temperature, exponent);
  const float total = static_cast<float>(n) + 1e-6f;
  for (int64_t i = 0; i < n; ++i) {
    float e = static_cast<float>(i + 1);
    if (normalize) e = e / total * scale;
    const double angle = static_cast<double>(e / d);
    out[i * feats] = static_cast<float>(k % 2 == 0 ? std::sin(angle) : std::cos(angle));
  }
}

Ort::Status SinePositionEmbedding(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                                  const Ort::Custom::Tensor<float>& params, Ort::Custom::Tensor<float>& pos) {
  const char* op = "SinePositionEmbedding";
  const std::vector<int64_t> xs = x.Shape();
  if (xs.size() != 4) return fail(op, "x must be (N, C, H, W), not " + dims(xs));
  if (params.Shape() != std::vector<int64_t>{5}) {
    return fail(op, "params must be (5): F, temperature, scale, normalize, channels_last; not " + dims(params.Shape()));
  }
  const float* p = params.Data();
  const float f_value = p[0], temperature = p[1], scale = p[2];
  if (!(f_value >= 2 && f_value <= 65536 && f_value == std::floor(f_value) && std::fmod(f_value, 2.0f) == 0)) {
    return fail(op, "F must be an even whole number from 2 to 65536, not " + std::to_string(f_value));
  }
  if (!(temperature > 0 && std::isfinite(temperature)) || !std::isfinite(scale) || (p[3] != 0 && p[3] != 1) ||
      (p[4] != 0 && p[4] != 1)) {
    return fail(op, "temperature must be positive and finite, scale finite, normalize and channels_last 0 or 1");
  }
  const bool channels_last = p[4] != 0;
  const int64_t feats = static_cast<int64_t>(f_value), n = xs[0], h = xs[2], w = xs[3];
  float* out = pos.Allocate(channels_last ? std::vector<int64_t>{n, h, w, 2 * feats}
                                          : std::vector<int64_t>{n, 2 * feats, h, w});
  if (n == 0 || h == 0 || w == 0) return Ort::Status{nullptr};
  std::vector<float> table(static_cast<size_t>((h + w) * feats));
  for (int64_t k = 0; k < feats; ++k) {
    axis_values(h, k, feats, temperature, scale, p[3] != 0, table.data() + k);
    axis_values(w, k, feats, temperature, scale, p[3] != 0, table.data() + h * feats + k);
  }
  Fill fill{table.data(), out, feats, h, w};
  Ort::KernelContext(context).ParallelFor(channels_last ? fill_rows : fill_planes,
                                          static_cast<size_t>(channels_last ? n * h : n * 2 * feats), 0, &fill);
  return Ort::Status{nullptr};
}

Ort::Status SinePositionEmbeddingChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                                         const Ort::Custom::Tensor<float>& params, Ort::Custom::Tensor<float>& pos) {
  return m2fp::checked("SinePositionEmbedding", [&] { return SinePositionEmbedding(context, x, params, pos); });
}

}  // namespace

void m2fp_add_posembed_op(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(
      Ort::Custom::CreateLiteCustomOp("SinePositionEmbedding", "CPUExecutionProvider", SinePositionEmbeddingChecked));
  domain.Add(keep.back().get());
}
