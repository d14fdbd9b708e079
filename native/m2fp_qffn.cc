// An INT8 transformer feed-forward block as one op, ai.m2fp::QFeedForward:
//
//   h = QuantizeLinear(relu(MatMulIntegerToFloat(x, w1) + b1), h_scale, h_zero_point)
//   y = MatMulIntegerToFloat(h, w2) + b2
//
//   x (..., D) uint8 with x_scale, x_zero_point (scalars); w1 (D, F) int8 with w1_scale (F) or a
//   scalar, zero points 0; b1 (F) float; h_scale (scalar float), h_zero_point (scalar uint8); w2 (F, E)
//   int8 with w2_scale (E) or a scalar; b2 (E) float -> y (..., E) float.
//
// What the INT8 model's quantize-dequantize chain (QuantizeLinear, DequantizeLinear -> MatMul, Add,
// Relu, QuantizeLinear, DequantizeLinear -> MatMul, Add) computes; ONNX Runtime runs it as two
// MatMulIntegerToFloat, two float Adds and a QuantizeLinear, writing the float hidden tensor (62 MB per
// pixel-decoder encoder layer at 640 x 1152) and reading it back. Here each task takes 32 rows through
// both products with the hidden rows (as uint8) in cache, and the products run on AMX tiles
// (m2fp_qffn_x86.cc, ~6x the int8 rate of AVX-512 VNNI here) where the CPU has them and the kernel lets
// this process use them, else with AVX-512 VNNI where the CPU has it. Elsewhere plain loops give the same
// bits, slowly: the graph rewrite (m2fp_service/qfeedforward.py) is only applied where m2fp_qffn_kernel()
// is not "generic".
// D and F are multiples of 64, F and E of 32 (the tiles).
//
// And one such layer with a float output, ai.m2fp::QLinear (the encoder's value and output projections):
//
//   y = MatMulIntegerToFloat(x, w) + b     x (..., D) uint8 with x_scale, x_zero_point; w (D, E) int8 with
//                                          w_scale (E) or a scalar; b (E) float -> y (..., E) float
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(M2FP_QFFN_X86)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "m2fp_checked.h"
#include "m2fp_qffn.h"
#include "m2fp_qffn_product.h"

namespace {

using m2fp::kQffnColumns;
using m2fp::kQffnDepth;
using m2fp::kQffnRows;
// The deepest product whose int32 sums cannot overflow: 255 x 128 x 65536 < 2^31 (and the zero-point term).
constexpr int64_t kQffnMaxDepth = 65536;

// The blocks' builds (m2fp_qffn_x86.cc, where the library was built with it for x86-64).
using Kernel = m2fp::Int8Kernel;

// AVX-512 with VNNI: what m2fp_qffn_x86.cc is built for besides AMX.
bool vnni_usable() {
#if defined(M2FP_QFFN_X86)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AMX-TILE and AMX-INT8 in CPUID, the tile state enabled by the OS (XCR0 bits 17-18), and the tile data
// granted to this process (Linux arch_prctl ARCH_REQ_XCOMP_PERM; ONNX Runtime asks for it too).
bool amx_usable() {
#if defined(M2FP_QFFN_X86)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!vnni_usable()) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv is there
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

// AMX where the tiles run, else AVX-512 VNNI where the CPU has it, else the plain loops.
// M2FP_QFFN_KERNEL=avx512-vnni or =generic caps it, any other value does not (read once per process; the tests
// use it to compare the builds).
Kernel choose() {
  const char* env = std::getenv("M2FP_QFFN_KERNEL");
  const std::string cap = env == nullptr ? "" : env;
  if (cap == "generic" || !vnni_usable()) return Kernel::kGeneric;
  return cap != "avx512-vnni" && amx_usable() ? Kernel::kAmx : Kernel::kVnni;
}
Kernel kernel() {
  static const Kernel chosen = choose();
  return chosen;
}

// w (depth, n) -> AMX weight tiles: for each 16 columns, depth / 64 tiles of 1 KB one after the other,
// tile row t holding, for each of the 16 columns, the 4 bytes of depth 4t .. 4t + 3 (what `tdpbusd`
// multiplies with a 64-byte row of the input).
void pack_tiles(const int8_t* w, int64_t depth, int64_t n, int8_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    for (int64_t k = 0; k < depth; k += 4) {
      for (int64_t c = 0; c < 16; ++c) {
        for (int64_t q = 0; q < 4; ++q) *out++ = w[(k + q) * n + j + c];
      }
    }
  }
}

float dequantized(int32_t acc, const m2fp::QLayer& layer, int64_t j) {
  const float v = static_cast<float>(acc - layer.corr[j]) * layer.mult[j];
  return v + layer.bias[j];
}

// The plain loops: the same arithmetic as m2fp_qffn_x86.cc in the same order (the int32 sums are exact in
// any order). `acc` holds max(F, E) int32.
void block_generic(const m2fp::QFfn& c, int64_t r0, int64_t rows, uint8_t* hidden, int32_t* acc) {
  const int64_t d = c.one.depth, f = c.one.n, e = c.two.n;
  const float low = static_cast<float>(-c.h_zero_point), high = static_cast<float>(255 - c.h_zero_point);
  const auto product = [acc](const uint8_t* a, const int8_t* w, int64_t depth, int64_t n) {
    std::fill(acc, acc + n, 0);
    for (int64_t k = 0; k < depth; ++k) {
      const int32_t v = a[k];
      for (int64_t j = 0; j < n; ++j) acc[j] += v * w[k * n + j];
    }
  };
  for (int64_t i = 0; i < rows; ++i) {
    product(c.x + (r0 + i) * d, c.one.w, d, f);
    if (c.two.w == nullptr) {  // QLinear: the first layer's output is y
      for (int64_t j = 0; j < f; ++j) c.y[(r0 + i) * f + j] = dequantized(acc[j], c.one, j);
      continue;
    }
    for (int64_t j = 0; j < f; ++j) {
      float v = dequantized(acc[j], c.one, j);
      v = v < 0.0f ? 0.0f : v;  // relu; NaN stays
      v = v / c.h_scale;
      v = v > low ? v : low;  // NaN -> low (max_ps's rule), as ONNX Runtime's QuantizeLinear
      v = v < high ? v : high;
      hidden[j] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(v)) + c.h_zero_point);
    }
    product(hidden, c.two.w, f, e);
    float* y = c.y + (r0 + i) * e;
    for (int64_t j = 0; j < e; ++j) y[j] = dequantized(acc[j], c.two, j);
  }
}

struct Call {
  m2fp::QFfn ffn;
  Kernel kernel;
  std::atomic<bool> failed{false};
};

// Task i: rows [i * kQffnRows, (i + 1) * kQffnRows). Runs on a pool thread, through C: no exception may
// leave it; the op reports a failure after ParallelFor.
void row_block(void* data, size_t index) {
  Call& call = *static_cast<Call*>(data);
  const m2fp::QFfn& c = call.ffn;
  const int64_t r0 = static_cast<int64_t>(index) * kQffnRows, rows = std::min(kQffnRows, c.rows - r0);
  try {
    thread_local std::vector<uint8_t> hidden, pad;  // per thread, kept between calls
    thread_local std::vector<int32_t> acc;
    const auto grow = [](auto& v, int64_t size) {
      if (v.size() < static_cast<size_t>(size)) v.resize(static_cast<size_t>(size));
    };
    grow(hidden, kQffnRows * c.one.n);
    grow(acc, std::max({kQffnRows * kQffnColumns, c.one.n, c.two.n}));
    grow(pad, kQffnRows * c.one.depth);
    if (call.kernel == Kernel::kGeneric) {
      block_generic(c, r0, rows, hidden.data(), acc.data());
      return;
    }
#if defined(M2FP_QFFN_X86)
    const m2fp::QScratch scratch{hidden.data(), acc.data(), pad.data()};
    const bool amx = call.kernel == Kernel::kAmx;
    if (amx) m2fp_qffn_amx_begin();
    if (c.two.w == nullptr) {
      m2fp_qlinear_block_x86(c.one, c.x + r0 * c.one.depth, c.y + r0 * c.one.n, rows, scratch, amx);
    } else {
      m2fp_qffn_block_x86(c, r0, rows, scratch, amx);
    }
    if (amx) m2fp_qffn_amx_end();
#endif
  } catch (...) {  // std::bad_alloc from the buffers
    call.failed = true;
  }
}

using m2fp::dims;
using m2fp::fail;
using m2fp::scalar;

// y (..., E) for x of `shape` (..., D), allocated; `rows` = the product of x's leading dimensions.
float* allocated(Ort::Custom::Tensor<float>& y, std::vector<int64_t> shape, int64_t e, int64_t& rows) {
  rows = m2fp::rows_of(shape);
  shape.back() = e;
  return y.Allocate(shape);
}

// A layer's per-column arrays: corr = x_zero_point x column sums of w, mult = x_scale x w's scale.
struct Prepared {
  std::vector<int32_t> corr;
  std::vector<float> mult;
  std::vector<int8_t> tiles;
};

Prepared prepare(const int8_t* w, int64_t depth, int64_t n, const float* w_scale, bool per_column, float x_scale,
                 int32_t x_zero_point, bool packed) {
  Prepared p{std::vector<int32_t>(static_cast<size_t>(n), 0), std::vector<float>(static_cast<size_t>(n)), {}};
  for (int64_t k = 0; k < depth; ++k) {
    for (int64_t j = 0; j < n; ++j) p.corr[j] += w[k * n + j];
  }
  for (int64_t j = 0; j < n; ++j) {
    p.corr[j] *= x_zero_point;
    p.mult[j] = x_scale * w_scale[per_column ? j : 0];
  }
  if (packed) {
    p.tiles.resize(static_cast<size_t>(depth * n));
    pack_tiles(w, depth, n, p.tiles.data());
  }
  return p;
}

// Runs `ffn` (two.w null: a QLinear) by blocks of kQffnRows rows on ONNX Runtime's pool.
Ort::Status run(OrtKernelContext* context, const m2fp::QFfn& ffn, Kernel kernel, const char* op) {
  Call call{ffn, kernel};
  Ort::KernelContext(context).ParallelFor(row_block, static_cast<size_t>((ffn.rows + kQffnRows - 1) / kQffnRows), 0,
                                          &call);
  if (call.failed) return Ort::Status((std::string("ai.m2fp::") + op + ": out of memory for its buffers").c_str(), ORT_FAIL);
  return Ort::Status{nullptr};
}

Ort::Status QFeedForward(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                         const Ort::Custom::Tensor<float>& x_scale, const Ort::Custom::Tensor<uint8_t>& x_zero_point,
                         const Ort::Custom::Tensor<int8_t>& w1, const Ort::Custom::Tensor<float>& w1_scale,
                         const Ort::Custom::Tensor<float>& b1, const Ort::Custom::Tensor<float>& h_scale,
                         const Ort::Custom::Tensor<uint8_t>& h_zero_point, const Ort::Custom::Tensor<int8_t>& w2,
                         const Ort::Custom::Tensor<float>& w2_scale, const Ort::Custom::Tensor<float>& b2,
                         Ort::Custom::Tensor<float>& y) {
  const char* op = "QFeedForward";
  const std::vector<int64_t> xs = x.Shape(), w1s = w1.Shape(), w2s = w2.Shape();
  int64_t d = 0, f = 0, e = 0;
  if (const std::string wrong = m2fp::block_shapes(xs, w1s, w2s, d, f, e); !wrong.empty()) return fail(op, wrong);
  const std::string weights = "; w1 " + dims(w1s) + ", w2 " + dims(w2s);
  if (d % kQffnDepth != 0 || f % kQffnDepth != 0 || e % kQffnColumns != 0) {
    return fail(op, "D and F must be multiples of 64 and E of 32" + weights);
  }
  if (d > kQffnMaxDepth || f > kQffnMaxDepth) return fail(op, "D and F must be at most 65536 (int32 sums)" + weights);
  for (const auto* t : {&x_scale, &h_scale}) {
    if (!scalar(t->Shape())) return fail(op, "x_scale and h_scale must be scalars");
  }
  if (!scalar(x_zero_point.Shape()) || !scalar(h_zero_point.Shape())) {
    return fail(op, "x_zero_point and h_zero_point must be scalars");
  }
  const std::vector<int64_t> s1 = w1_scale.Shape(), s2 = w2_scale.Shape();
  if (!scalar(s1) && s1 != std::vector<int64_t>{f}) return fail(op, "w1_scale must be a scalar or (F), not " + dims(s1));
  if (!scalar(s2) && s2 != std::vector<int64_t>{e}) return fail(op, "w2_scale must be a scalar or (E), not " + dims(s2));
  if (b1.Shape() != std::vector<int64_t>{f}) return fail(op, "b1 must be (F) = (" + std::to_string(f) + "), not " + dims(b1.Shape()));
  if (b2.Shape() != std::vector<int64_t>{e}) return fail(op, "b2 must be (E) = (" + std::to_string(e) + "), not " + dims(b2.Shape()));
  const float hs = *h_scale.Data();
  if (!(hs > 0.0f) || !std::isfinite(hs)) return fail(op, "h_scale must be a positive finite number");
  int64_t rows = 0;
  float* out = allocated(y, xs, e, rows);
  if (rows == 0) return Ort::Status{nullptr};

  const Kernel k = kernel();
  const bool packed = k != Kernel::kGeneric;
  const int32_t x_zp = *x_zero_point.Data(), h_zp = *h_zero_point.Data();
  const Prepared one = prepare(w1.Data(), d, f, w1_scale.Data(), !scalar(s1), *x_scale.Data(), x_zp, packed);
  const Prepared two = prepare(w2.Data(), f, e, w2_scale.Data(), !scalar(s2), hs, h_zp, packed);
  return run(context, {x.Data(), out, rows,
                       {w1.Data(), packed ? one.tiles.data() : nullptr, one.corr.data(), one.mult.data(), b1.Data(), d, f},
                       {w2.Data(), packed ? two.tiles.data() : nullptr, two.corr.data(), two.mult.data(), b2.Data(), f, e},
                       hs, h_zp},
             k, op);
}

Ort::Status QLinear(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                    const Ort::Custom::Tensor<float>& x_scale, const Ort::Custom::Tensor<uint8_t>& x_zero_point,
                    const Ort::Custom::Tensor<int8_t>& w, const Ort::Custom::Tensor<float>& w_scale,
                    const Ort::Custom::Tensor<float>& b, Ort::Custom::Tensor<float>& y) {
  const char* op = "QLinear";
  const std::vector<int64_t> xs = x.Shape(), ws = w.Shape(), ss = w_scale.Shape();
  if (xs.empty()) return fail(op, "x must have a last dimension (..., D)");
  if (ws.size() != 2 || ws[0] != xs.back()) {
    return fail(op, "w must be (D, E) with D = x's last dimension; x " + dims(xs) + ", w " + dims(ws));
  }
  const int64_t d = ws[0], e = ws[1];
  if (d % kQffnDepth != 0 || e % kQffnColumns != 0) return fail(op, "D must be a multiple of 64 and E of 32; w " + dims(ws));
  if (d > kQffnMaxDepth) return fail(op, "D must be at most 65536 (int32 sums); w " + dims(ws));
  if (!scalar(x_scale.Shape()) || !scalar(x_zero_point.Shape())) return fail(op, "x_scale and x_zero_point must be scalars");
  if (!scalar(ss) && ss != std::vector<int64_t>{e}) return fail(op, "w_scale must be a scalar or (E), not " + dims(ss));
  if (b.Shape() != std::vector<int64_t>{e}) return fail(op, "b must be (E) = (" + std::to_string(e) + "), not " + dims(b.Shape()));
  int64_t rows = 0;
  float* out = allocated(y, xs, e, rows);
  if (rows == 0) return Ort::Status{nullptr};
  const Kernel k = kernel();
  const bool packed = k != Kernel::kGeneric;
  const Prepared one = prepare(w.Data(), d, e, w_scale.Data(), !scalar(ss), *x_scale.Data(), *x_zero_point.Data(),
                               packed);
  return run(context, {x.Data(), out, rows,
                       {w.Data(), packed ? one.tiles.data() : nullptr, one.corr.data(), one.mult.data(), b.Data(), d, e},
                       {}, 1.0f, 0},
             k, op);
}

Ort::Status QFeedForwardChecked(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                                const Ort::Custom::Tensor<float>& x_scale,
                                const Ort::Custom::Tensor<uint8_t>& x_zero_point, const Ort::Custom::Tensor<int8_t>& w1,
                                const Ort::Custom::Tensor<float>& w1_scale, const Ort::Custom::Tensor<float>& b1,
                                const Ort::Custom::Tensor<float>& h_scale,
                                const Ort::Custom::Tensor<uint8_t>& h_zero_point, const Ort::Custom::Tensor<int8_t>& w2,
                                const Ort::Custom::Tensor<float>& w2_scale, const Ort::Custom::Tensor<float>& b2,
                                Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("QFeedForward", [&] {
    return QFeedForward(context, x, x_scale, x_zero_point, w1, w1_scale, b1, h_scale, h_zero_point, w2, w2_scale, b2, y);
  });
}

Ort::Status QLinearChecked(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                           const Ort::Custom::Tensor<float>& x_scale, const Ort::Custom::Tensor<uint8_t>& x_zero_point,
                           const Ort::Custom::Tensor<int8_t>& w, const Ort::Custom::Tensor<float>& w_scale,
                           const Ort::Custom::Tensor<float>& b, Ort::Custom::Tensor<float>& y) {
  return m2fp::checked("QLinear", [&] { return QLinear(context, x, x_scale, x_zero_point, w, w_scale, b, y); });
}

}  // namespace

m2fp::Int8Kernel m2fp::int8_kernel() { return kernel(); }

// Which build of the INT8 ops' blocks this process runs: "amx", "avx512-vnni" or "generic" (ctypes; the engine
// applies the INT8 rewrites only where it is not "generic").
extern "C" __attribute__((visibility("default"))) const char* m2fp_qffn_kernel(void) {
  switch (kernel()) {
    case Kernel::kAmx:
      return "amx";
    case Kernel::kVnni:
      return "avx512-vnni";
    default:
      return "generic";
  }
}

void m2fp_add_qfeedforward_ops(Ort::CustomOpDomain& domain,
                              std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("QFeedForward", "CPUExecutionProvider", QFeedForwardChecked));
  domain.Add(keep.back().get());
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("QLinear", "CPUExecutionProvider", QLinearChecked));
  domain.Add(keep.back().get());
}
