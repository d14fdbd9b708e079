// 3x3 convolutions as Winograd F(4x4, 3x3): the transforms of ai.m2fp::Winograd4x3Input and
// ai.m2fp::Winograd4x3Output[Relu]. The product between them is a standard batched MatMul in the
// graph (ONNX Runtime's own GEMM), with the filters transformed once, when the graph is rewritten
// (`m2fp_service/winograd.py`, which also says which convolutions qualify).
//
// A 3x3 convolution (stride 1, padding 1) computes each 4x4 block of output from a 6x6 block of
// input with 36 multiplications per input/output channel pair instead of 144 (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2016, points 0, +-1, +-2):
//   Y_tile = A^T [ (G g G^T) * (B^T d B) ] A,   summed over input channels,
// so the 36 elementwise products over channels are 36 matrix products:
//   V[e] (T, C) = (B^T d B)[e] of every tile,  M[e] (T, K) = V[e] @ U[e] (C, K),  U[e] = (G g G^T)[e].
//
//   Winograd4x3Input   x (N, C, H, W) float, band [index, count] int64
//                      ->  v (36, N*rows*tw, C): the band's tiles, th = ceil(H/4) rows of tw = ceil(W/4)
//   Winograd4x3Output  m (36, N*rows*tw, K), bias (K), like (N, C, H, W): only its shape is read, band
//                      ->  y (N, K, rows', W) = the band's rows of the convolution plus bias ("Relu":
//                          then max(0, .)), rows' = its 4*rows output rows that lie in the picture
// A band is the tile rows th*index/count up to th*(index+1)/count: a large convolution done in
// bands (concatenated along H) keeps its transformed tensors (v and m are 9x and 9K/C x its input) small.
// Tile (ty, tx) covers output rows 4ty..4ty+3 and columns 4tx..4tx+3, and reads input rows and
// columns from 4ty-1 and 4tx-1 on (zero outside the picture, as padding 1 does). Channel counts
// are multiples of 8: the transforms work on 8 channels at once.
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "m2fp_checked.h"
#include "m2fp_simd.h"
#include "m2fp_winograd.h"

namespace {

// Eight channels side by side: every formula below runs on 8 channels at once (GCC/Clang vector
// extensions; SSE pairs, AVX or AVX-512 halves, whichever the clone is built for). aligned(4):
// loads and stores through it need no alignment.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;

__attribute__((always_inline)) inline v8 load(const float* p) { return *reinterpret_cast<const v8*>(p); }
__attribute__((always_inline)) inline void store(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }

// A picture's tiles, and the band of tile rows [r0, r0 + rows) that one op call covers.
struct Plan {
  int64_t n, channels, height, width, th, tw, r0, rows;
  int64_t tiles() const { return n * rows * tw; }
  int64_t tile(int64_t b, int64_t ty) const { return (b * rows + ty - r0) * tw; }  // first tile of a row
  int64_t out_height() const { return std::max<int64_t>(0, std::min(height, 4 * (r0 + rows)) - 4 * r0); }
};

// B^T d: 6 values from 6 (Lavin & Gray's F(4, 3), points 0, +-1, +-2).
__attribute__((always_inline)) inline void input_1d(const v8* d, v8* o) {
  const v8 a = d[4] - 4.f * d[2], b = d[3] - 4.f * d[1], c = d[4] - d[2], e = 2.f * (d[3] - d[1]);
  o[0] = 4.f * d[0] - 5.f * d[2] + d[4];
  o[1] = a + b;
  o[2] = a - b;
  o[3] = c + e;
  o[4] = c - e;
  o[5] = 4.f * d[1] - 5.f * d[3] + d[5];
}

// A^T m: 4 values from 6.
__attribute__((always_inline)) inline void output_1d(const v8* m, v8* o) {
  const v8 s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  o[0] = m[0] + s12 + s34;
  o[1] = d12 + 2.f * d34;
  o[2] = s12 + 4.f * s34;
  o[3] = d12 + 8.f * d34 + m[5];
}

struct InputTask {
  Plan p;
  const float* x;  // (N, C, H, W)
  float* v;        // (36, N*T, C)
};

// One tile row of 8 channels: the 6 input rows interleaved channel-minor (zero outside the
// picture), then each tile's 6x6 block transformed and stored as 36 runs of 8 channels.
M2FP_CLONES void input_block(const InputTask& task, int64_t b, int64_t c0, int64_t ty) {
  const Plan& p = task.p;
  const int64_t tw = p.tw, padded = 4 * tw + 2, nt = p.tiles(), C = p.channels;
  std::vector<float> buffer(static_cast<size_t>(6 * padded * kLanes), 0.f);
  float* rows = buffer.data();  // (6, padded, 8): rows[r][k][lane] = x[c0 + lane][4ty - 1 + r][k - 1]
  for (int r = 0; r < 6; ++r) {
    const int64_t y = 4 * ty - 1 + r;
    if (y < 0 || y >= p.height) continue;
    float* dst = rows + (r * padded + 1) * kLanes;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const float* src = task.x + ((b * C + c0 + lane) * p.height + y) * p.width;
      for (int64_t k = 0; k < p.width; ++k) dst[k * kLanes + lane] = src[k];
    }
  }
  const int64_t t0 = p.tile(b, ty);
  for (int64_t tx = 0; tx < tw; ++tx) {
    v8 d[6], u[6][6], col[6], out[6];
    for (int r = 0; r < 6; ++r) {  // along x: each input row's 6 values
      const float* src = rows + (r * padded + 4 * tx) * kLanes;
      for (int s = 0; s < 6; ++s) d[s] = load(src + s * kLanes);
      input_1d(d, u[r]);
    }
    float* dst = task.v + (t0 + tx) * C + c0;
    for (int j = 0; j < 6; ++j) {  // along y
      for (int r = 0; r < 6; ++r) col[r] = u[r][j];
      input_1d(col, out);
      for (int i = 0; i < 6; ++i) store(dst + (6 * i + j) * nt * C, out[i]);
    }
  }
}

// One tile row of one image, every channel: the blocks of 8 channels one after the other fill the
// same cache lines of v, which stay in cache in between (v is 9x the input's size).
void input_task(void* data, size_t index) {
  const InputTask& task = *static_cast<const InputTask*>(data);
  const int64_t i = static_cast<int64_t>(index);
  const int64_t b = i / task.p.rows, ty = task.p.r0 + i % task.p.rows;
  for (int64_t c0 = 0; c0 < task.p.channels; c0 += kLanes) input_block(task, b, c0, ty);
}

struct OutputTask {
  Plan p;          // channels = output channels
  const float* m;  // (36, N*T, K)
  const float* bias;
  float* y;        // (N, K, H, W)
  bool relu;
};

// One tile row of 8 output channels: each tile's 36 products back to a 4x4 block, bias and
// activation added, interleaved channel-minor in a buffer and then written to the 8 planes.
M2FP_CLONES void output_block(const OutputTask& task, int64_t b, int64_t k0, int64_t ty) {
  const Plan& p = task.p;
  const int64_t tw = p.tw, wide = 4 * tw, nt = p.tiles(), K = p.channels;
  std::vector<float> buffer(static_cast<size_t>(4 * wide * kLanes));
  float* rows = buffer.data();  // (4, wide, 8)
  const v8 bias = load(task.bias + k0);
  const v8 zero = bias - bias;
  const int64_t t0 = p.tile(b, ty), band_height = p.out_height();
  for (int64_t tx = 0; tx < tw; ++tx) {
    const float* src = task.m + (t0 + tx) * K + k0;
    v8 m[6], w[4][6], o[4];
    for (int j = 0; j < 6; ++j) {  // along y
      for (int i = 0; i < 6; ++i) m[i] = load(src + (6 * i + j) * nt * K);
      output_1d(m, o);
      for (int a = 0; a < 4; ++a) w[a][j] = o[a];
    }
    for (int a = 0; a < 4; ++a) {  // along x
      output_1d(w[a], o);
      for (int c = 0; c < 4; ++c) {
        v8 value = o[c] + bias;
        if (task.relu) value = value > zero ? value : zero;
        store(rows + (a * wide + 4 * tx + c) * kLanes, value);
      }
    }
  }
  for (int a = 0; a < 4; ++a) {
    const int64_t y = 4 * ty + a;
    if (y >= p.height) break;
    const float* src = rows + a * wide * kLanes;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      float* dst = task.y + ((b * K + k0 + lane) * band_height + y - 4 * p.r0) * p.width;
      for (int64_t x = 0; x < p.width; ++x) dst[x] = src[x * kLanes + lane];
    }
  }
}

void output_task(void* data, size_t index) {
  const OutputTask& task = *static_cast<const OutputTask*>(data);
  const int64_t i = static_cast<int64_t>(index);
  const int64_t b = i / task.p.rows, ty = task.p.r0 + i % task.p.rows;
  for (int64_t k0 = 0; k0 < task.p.channels; k0 += kLanes) output_block(task, b, k0, ty);
}

using m2fp::fail;

// The plan of a picture of `shape` and the band [index, count] (tile rows th*index/count up to
// th*(index+1)/count), or the reason there is none.
std::string plan_of(const std::vector<int64_t>& shape, const Ort::Custom::Tensor<int64_t>& band, Plan& p) {
  if (shape.size() != 4) return "x must be (N, C, H, W)";
  for (int64_t d : shape) {
    if (d < 0) return "negative dimension";
  }
  if (band.NumberOfElement() != 2) return "band must hold [index, count]";
  const int64_t index = band.Data()[0], count = band.Data()[1];
  if (count < 1 || count > 64 || index < 0 || index >= count) return "band must be [index, count], 0 <= index < count <= 64";
  p = Plan{};
  p.n = shape[0];
  p.channels = shape[1];
  p.height = shape[2];
  p.width = shape[3];
  p.th = (p.height + 3) / 4;
  p.tw = (p.width + 3) / 4;
  p.r0 = p.th * index / count;
  p.rows = p.th * (index + 1) / count - p.r0;
  return "";
}

Ort::Status Input(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<int64_t>& band,
                  Ort::Custom::Tensor<float>& v) {
  InputTask task{};
  const std::string error = plan_of(x.Shape(), band, task.p);
  if (!error.empty()) return fail("Winograd4x3Input", error);
  if (task.p.channels % kLanes != 0) return fail("Winograd4x3Input", "channels must be a multiple of 8");
  task.x = x.Data();
  task.v = v.Allocate({36, task.p.tiles(), task.p.channels});
  if (task.p.tiles() == 0 || task.p.channels == 0) return Ort::Status{nullptr};
  Ort::KernelContext(context).ParallelFor(input_task, static_cast<size_t>(task.p.n * task.p.rows), 0, &task);
  return Ort::Status{nullptr};
}

Ort::Status Output(OrtKernelContext* context, const Ort::Custom::Tensor<float>& m, const Ort::Custom::Tensor<float>& bias,
                   const Ort::Custom::Tensor<float>& like, const Ort::Custom::Tensor<int64_t>& band,
                   Ort::Custom::Tensor<float>& y, bool relu, const char* name) {
  const std::vector<int64_t> ms = m.Shape(), bs = bias.Shape();
  OutputTask task{};
  const std::string error = plan_of(like.Shape(), band, task.p);
  if (!error.empty()) return fail(name, error);
  task.m = m.Data();
  task.bias = bias.Data();
  task.relu = relu;
  if (ms.size() != 3 || ms[0] != 36) return fail(name, "m must be (36, tiles, K)");
  task.p.channels = ms[2];
  if (task.p.channels % kLanes != 0) return fail(name, "channels must be a multiple of 8");
  if (ms[1] != task.p.tiles()) {
    return fail(name, "m has " + std::to_string(ms[1]) + " tiles, the picture " + std::to_string(task.p.tiles()));
  }
  if (bs.size() != 1 || bs[0] != task.p.channels) return fail(name, "bias must be (K)");
  task.y = y.Allocate({task.p.n, task.p.channels, task.p.out_height(), task.p.width});
  if (task.p.tiles() == 0 || task.p.channels == 0) return Ort::Status{nullptr};
  Ort::KernelContext(context).ParallelFor(output_task, static_cast<size_t>(task.p.n * task.p.rows), 0, &task);
  return Ort::Status{nullptr};
}

Ort::Status InputChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                         const Ort::Custom::Tensor<int64_t>& band, Ort::Custom::Tensor<float>& v) {
  return m2fp::checked("Winograd4x3Input", [&] { return Input(context, x, band, v); });
}

Ort::Status OutputChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& m,
                          const Ort::Custom::Tensor<float>& bias, const Ort::Custom::Tensor<float>& like,
                          const Ort::Custom::Tensor<int64_t>& band, Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("Winograd4x3Output",
                       [&] { return Output(context, m, bias, like, band, y, false, "Winograd4x3Output"); });
}

Ort::Status OutputReluChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& m,
                              const Ort::Custom::Tensor<float>& bias, const Ort::Custom::Tensor<float>& like,
                              const Ort::Custom::Tensor<int64_t>& band, Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("Winograd4x3OutputRelu",
                       [&] { return Output(context, m, bias, like, band, y, true, "Winograd4x3OutputRelu"); });
}

}  // namespace

void m2fp_add_winograd_ops(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("Winograd4x3Input", "CPUExecutionProvider", InputChecked));
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("Winograd4x3Output", "CPUExecutionProvider", OutputChecked));
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("Winograd4x3OutputRelu", "CPUExecutionProvider", OutputReluChecked));
  for (size_t i = keep.size() - 3; i < keep.size(); ++i) domain.Add(keep[i].get());
}
