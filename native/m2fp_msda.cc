// Multi-scale deformable attention as one ONNX Runtime CPU kernel: ai.m2fp::MSDeformAttn.
//
// The exported graph computes the same thing with standard ops (per level: GridSample, Mul,
// ReduceSum, Add; the model-local function `ai.m2fp.MSDeformAttn` in the ONNX file), which ONNX
// Runtime runs when this library is not registered. GridSample recomputes each sample's
// coordinates and corner weights for every channel and writes every sample before the weighted
// sum reads it back; here each sample's coordinates are computed once, its four corners are read
// as contiguous rows of the head's channels (value is channels-last), and the attention weight is
// folded into the bilinear weights, so nothing but the output is written.
//
// Inputs (the layout the export's `msda.sample_levels` takes, no transposes needed):
//   value    (N, S, heads, D) float    all levels' projected values, flattened, S = sum(H_l W_l)
//   shapes   (L, 2)           int64    (H_l, W_l) of each level
//   grids    (N*heads, Q, L, P, 2)     sampling points (x, y) in grid_sample's [-1, 1] coordinates
//   weights  (N*heads, 1, Q, L, P)     attention weights (softmaxed over L*P)
// Output:
//   out      (N, Q, heads*D) float
// Semantics: grid_sample(mode=bilinear, padding_mode=zeros, align_corners=False) per level,
// weighted and summed over levels and points.
#include <onnxruntime_lite_custom_op.h>

#include "m2fp_checked.h"
#include "m2fp_ffn.h"
#include "m2fp_qconv.h"
#include "m2fp_qgroupnorm.h"
#include "m2fp_qffn.h"
#include "m2fp_simd.h"
#include "m2fp_posembed.h"
#include "m2fp_softmax.h"
#include "m2fp_winograd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 1024;
constexpr int64_t kMaxLevels = 16;

struct Problem {
  const float* value;     // (N, S, heads, D) as given
  float* heads_first;     // (N*heads, S, D): value with each head's rows contiguous
  const float* grids;
  const float* weights;
  float* out;
  int64_t n, heads, dim, queries, levels, points, total;
  int64_t height[kMaxLevels], width[kMaxLevels], start[kMaxLevels];
  int64_t chunk;  // queries per task
};

// One (batch*head, block of queries) task: every output row of the block, accumulated in place.
// kDim > 0: the head size known at compile time (the accumulator stays in registers).
template <int64_t kDim>
M2FP_CLONES void run_block(const Problem& p, int64_t nh, int64_t q_begin, int64_t q_end) {
  const int64_t b = nh / p.heads, h = nh % p.heads, dim = kDim > 0 ? kDim : p.dim;
  const int64_t row = dim;  // floats between two pixels of one head
  const float* value = p.heads_first + nh * p.total * dim;
  float acc[kDim > 0 ? kDim : kMaxHeadDim];
  for (int64_t q = q_begin; q < q_end; ++q) {
    for (int64_t d = 0; d < dim; ++d) acc[d] = 0.f;
    const float* grid = p.grids + (nh * p.queries + q) * p.levels * p.points * 2;
    const float* weight = p.weights + (nh * p.queries + q) * p.levels * p.points;
    for (int64_t l = 0; l < p.levels; ++l) {
      const int64_t height = p.height[l], width = p.width[l];
      const float fw = static_cast<float>(width), fh = static_cast<float>(height);
      const float* level = value + p.start[l] * row;
      for (int64_t k = 0; k < p.points; ++k, grid += 2, ++weight) {
        // grid_sample, align_corners=False: pixel centres at (i + 0.5) / size * 2 - 1.
        const float x = ((grid[0] + 1.f) * fw - 1.f) * 0.5f;
        const float y = ((grid[1] + 1.f) * fh - 1.f) * 0.5f;
        if (!(x > -1.f && y > -1.f && x < fw && y < fh)) continue;  // no corner inside (or NaN): adds 0
        const float fx = std::floor(x), fy = std::floor(y);
        const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
        const float ax = x - fx, ay = y - fy, a = *weight;
        // A corner outside the level adds nothing (zero padding): its weight is 0, its index clamped.
        const bool left = x0 >= 0, right = x0 + 1 < width, top = y0 >= 0, bottom = y0 + 1 < height;
        const float w00 = (left && top) ? (1.f - ax) * (1.f - ay) * a : 0.f;
        const float w01 = (right && top) ? ax * (1.f - ay) * a : 0.f;
        const float w10 = (left && bottom) ? (1.f - ax) * ay * a : 0.f;
        const float w11 = (right && bottom) ? ax * ay * a : 0.f;
        const int64_t xa = left ? x0 : 0, xb = right ? x0 + 1 : width - 1;
        const int64_t ya = top ? y0 : 0, yb = bottom ? y0 + 1 : height - 1;
        const float* __restrict v00 = level + (ya * width + xa) * row;
        const float* __restrict v01 = level + (ya * width + xb) * row;
        const float* __restrict v10 = level + (yb * width + xa) * row;
        const float* __restrict v11 = level + (yb * width + xb) * row;
        for (int64_t d = 0; d < dim; ++d) acc[d] += w00 * v00[d] + w01 * v01[d] + w10 * v10[d] + w11 * v11[d];
      }
    }
    float* __restrict out = p.out + (b * p.queries + q) * p.heads * dim + h * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = acc[d];
  }
}

// Each head's rows made contiguous: in (N, S, heads, D) one head's pixels lie heads*D floats apart,
// a power-of-two stride that maps them onto a few cache sets; heads-first they are neighbours.
void copy_head(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t nh = static_cast<int64_t>(index), b = nh / p.heads, h = nh % p.heads;
  const float* src = p.value + b * p.total * p.heads * p.dim + h * p.dim;
  float* dst = p.heads_first + nh * p.total * p.dim;
  for (int64_t s = 0; s < p.total; ++s) std::memcpy(dst + s * p.dim, src + s * p.heads * p.dim, sizeof(float) * p.dim);
}

void run_task(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t blocks = (p.queries + p.chunk - 1) / p.chunk;
  const int64_t nh = static_cast<int64_t>(index) / blocks, block = static_cast<int64_t>(index) % blocks;
  const int64_t begin = block * p.chunk;
  const int64_t end = std::min(p.queries, begin + p.chunk);
  if (p.dim == 32) {
    run_block<32>(p, nh, begin, end);
  } else {
    run_block<0>(p, nh, begin, end);
  }
}

// The heads-first copy of value, from the session's allocator. ``GetAllocator`` returns a new wrapper
// each call: it is released too (else ~100 bytes leak per call), on every path.
struct Scratch {
  OrtAllocator* allocator = nullptr;
  void* data = nullptr;
  Scratch(const Ort::KernelContext& ctx, size_t bytes) {
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    allocator = ctx.GetAllocator(*cpu);
    data = allocator->Alloc(allocator, bytes);
    if (data == nullptr) {
      Ort::GetApi().ReleaseAllocator(allocator);
      throw std::bad_alloc();
    }
  }
  ~Scratch() {
    allocator->Free(allocator, data);
    Ort::GetApi().ReleaseAllocator(allocator);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

Ort::Status fail(const std::string& message) {
  return Ort::Status(("ai.m2fp::MSDeformAttn: " + message).c_str(), ORT_INVALID_ARGUMENT);
}

Ort::Status MSDeformAttn(OrtKernelContext* context, const Ort::Custom::Tensor<float>& value,
                         const Ort::Custom::Tensor<int64_t>& shapes, const Ort::Custom::Tensor<float>& grids,
                         const Ort::Custom::Tensor<float>& weights, Ort::Custom::Tensor<float>& out) {
  const std::vector<int64_t> vs = value.Shape(), ss = shapes.Shape(), gs = grids.Shape(), ws = weights.Shape();
  if (vs.size() != 4) return fail("value must be (N, S, heads, D)");
  if (ss.size() != 2 || ss[1] != 2) return fail("shapes must be (L, 2)");
  if (gs.size() != 5 || gs[4] != 2) return fail("grids must be (N*heads, Q, L, P, 2)");
  if (ws.size() != 5 || ws[1] != 1) return fail("weights must be (N*heads, 1, Q, L, P)");
  Problem p{};
  p.n = vs[0];
  p.total = vs[1];
  p.heads = vs[2];
  p.dim = vs[3];
  p.queries = gs[1];
  p.levels = gs[2];
  p.points = gs[3];
  if (p.dim > kMaxHeadDim || p.levels > kMaxLevels) return fail("head size or level count too large");
  if (ss[0] != p.levels) return fail("shapes has " + std::to_string(ss[0]) + " levels, grids " + std::to_string(p.levels));
  if (gs[0] != p.n * p.heads) return fail("grids' first axis must be N*heads");
  if (ws[0] != gs[0] || ws[2] != p.queries || ws[3] != p.levels || ws[4] != p.points) {
    return fail("weights must match grids' (N*heads, Q, L, P)");
  }
  const int64_t* hw = shapes.Data();
  int64_t start = 0;
  for (int64_t l = 0; l < p.levels; ++l) {
    p.height[l] = hw[2 * l];
    p.width[l] = hw[2 * l + 1];
    // Every level has pixels (an empty one would make the corner clamp below point outside it), and
    // the sizes fit in value's S pixels, checked by division so that H*W cannot overflow.
    if (p.height[l] <= 0 || p.width[l] <= 0) return fail("level sizes must be positive");
    if (p.width[l] > (p.total - start) / p.height[l]) {
      return fail("the levels' sizes add up to more than value's " + std::to_string(p.total) + " pixels");
    }
    p.start[l] = start;
    start += p.height[l] * p.width[l];
  }
  if (start != p.total) return fail("the levels' sizes add up to " + std::to_string(start) + ", value has " + std::to_string(p.total));
  p.value = value.Data();
  p.grids = grids.Data();
  p.weights = weights.Data();
  p.out = out.Allocate({p.n, p.queries, p.heads * p.dim});
  if (p.n == 0 || p.queries == 0 || p.heads == 0 || p.dim == 0) return Ort::Status{nullptr};
  if (p.total == 0) {  // no pixels (no levels): every sample adds nothing
    std::memset(p.out, 0, sizeof(float) * static_cast<size_t>(p.n * p.queries * p.heads * p.dim));
    return Ort::Status{nullptr};
  }
  Ort::KernelContext ctx(context);
  Scratch scratch(ctx, sizeof(float) * static_cast<size_t>(p.n * p.heads * p.total * p.dim));
  p.heads_first = static_cast<float*>(scratch.data);
  p.chunk = 256;
  const int64_t tasks = p.n * p.heads * ((p.queries + p.chunk - 1) / p.chunk);
  ctx.ParallelFor(copy_head, static_cast<size_t>(p.n * p.heads), 0, &p);
  ctx.ParallelFor(run_task, static_cast<size_t>(tasks), 0, &p);
  return Ort::Status{nullptr};
}

Ort::Status MSDeformAttnChecked(OrtKernelContext* context, const Ort::Custom::Tensor<float>& value,
                                const Ort::Custom::Tensor<int64_t>& shapes, const Ort::Custom::Tensor<float>& grids,
                                const Ort::Custom::Tensor<float>& weights, Ort::Custom::Tensor<float>& out) {
  return m2fp::checked("MSDeformAttn", [&] { return MSDeformAttn(context, value, shapes, grids, weights, out); });
}

}  // namespace

static const char* kDomain = "ai.m2fp";

// Lets the service tell this library from any other custom-op library (ctypes, before registering).
// 2: the Winograd convolution ops are there too; 3: and the feed-forward op; 4: and the linear op;
// 5: and the softmax op; 6: and the INT8 feed-forward and linear ops; 7: and the INT8 convolution;
// 8: and the INT8 group normalisation; 9: and the sine position embedding.
extern "C" __attribute__((visibility("default"))) int m2fp_msda_abi(void) { return 9; }

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static std::once_flag once;
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  static std::unique_ptr<Ort::CustomOpDomain> domain;  // one for every session, alive until unload
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than these headers: say so with the oldest API there is
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "libm2fp_msda needs ONNX Runtime 1.21 or newer (API 21)");
  }
  try {
    std::call_once(once, [api] {
      Ort::Global<void>::api_ = api;
      auto d = std::make_unique<Ort::CustomOpDomain>(kDomain);
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("MSDeformAttn", "CPUExecutionProvider", MSDeformAttnChecked));
      d->Add(ops.back().get());
      m2fp_add_winograd_ops(*d, ops);
      m2fp_add_feedforward_ops(*d, ops);
      m2fp_add_softmax_op(*d, ops);
      m2fp_add_posembed_op(*d, ops);
      m2fp_add_qfeedforward_ops(*d, ops);
      m2fp_add_qconv_op(*d, ops);
      m2fp_add_qgroupnorm_op(*d, ops);
      domain = std::move(d);
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
