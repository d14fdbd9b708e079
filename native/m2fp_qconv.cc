// An INT8 convolution of NHWC tensors on AMX tiles or with AVX-512 VNNI, ai.m2fp::QConv:
//
//   y = QLinearConv(x, x_scale, x_zero_point, w, w_scale, 0, y_scale, y_zero_point, b) with channels_last
//
//   x (N, H, W, C) uint8; x_zero_point (scalar uint8: the padding's value); tiles (kh x kw x C x Cout) int8:
//   the weights w (Cout, C, kh, kw) as a (kh x kw x C, Cout) matrix, depth tap-major (ky, kx, then C),
//   packed as AMX tiles; bias (Cout) int32: b minus x_zero_point x each output channel's weight sum;
//   scale (Cout) float: x_scale x w_scale / y_scale, in that order; y_zero_point (scalar uint8);
//   geometry (8) int64: kh, kw, stride h, stride w (both 1), pads top, left, bottom, right
//   -> y (N, H + top + bottom - kh + 1, W + left + right - kw + 1, Cout) uint8.
//
// What ONNX Runtime's com.microsoft::QLinearConv (channels_last, symmetric int8 weights) computes, bit for
// bit: the exact int32 sums plus the bias, times the scale in float, clamped in float to the output's range,
// rounded half to even, plus the zero point. ONNX Runtime runs it with AVX-512 VNNI (MLAS's symmetric
// convolution); this runs it on AMX tiles where the CPU has them (m2fp_qffn_x86.cc). The rewrite that puts it
// in the optimised graph, and packs the weights, is m2fp_service/qconv.py.
//
// A convolution is a product whose rows are the output positions: position (y, x) reads, for kernel position
// (ky, kx), the input row (y + ky, x + kx) of the input padded with x_zero_point. Over the padded width Wp,
// position q = y Wp + x reads row q + ky Wp + kx: one fixed offset per tap, so blocks of 32 consecutive q
// are tiles of 32 rows C bytes apart, whatever the tap. The Wp - Wo positions at the end of each row are
// computed and dropped (2 of 290 at the pixel decoder's 3 x 3, 0 for 1 x 1 convolutions, which read the
// input in place). C is a multiple of 64 (a tile row's depth), Cout of 32, the depth kh x kw x C at most 65536.
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "m2fp_checked.h"
#include "m2fp_qconv.h"
#include "m2fp_qffn_product.h"

namespace {

using m2fp::dims;
using m2fp::fail;
using m2fp::kQffnColumns;
using m2fp::kQffnDepth;
using m2fp::kQffnRows;
using m2fp::scalar;
constexpr int64_t kMaxDepth = 65536;  // 255 x 128 x 65536 < 2^31: the int32 sums cannot overflow
constexpr int64_t kMaxKernel = 15;

struct Plan {
  m2fp::QConv conv;
  const uint8_t* x;  // the padded input (images of hp x wp rows of c bytes), or the input itself (no padding)
  uint8_t* y;
  int64_t images, hp, wp, ho, wo;
  int64_t positions, blocks;  // per image: ho x wp positions in blocks of kQffnRows
  bool in_place;              // x is the op's input: a block reading past its end is copied first
  m2fp::Int8Kernel kernel;
  std::atomic<bool> failed{false};
};

// The packed weight of depth k and output channel n (pack_tiles' layout in m2fp_qffn.cc).
int8_t weight(const m2fp::QConv& conv, int64_t k, int64_t n) {
  const int64_t depth = conv.taps * conv.c;
  return conv.tiles[(n / 16) * depth * 16 + (k / 4) * 64 + (n % 16) * 4 + k % 4];
}

// The plain loops: the same arithmetic as m2fp_qffn_x86.cc's epilogue (the int32 sums are exact in any order).
void block_generic(const m2fp::QConv& conv, const uint8_t* a, uint8_t* const* out) {
  const float low = static_cast<float>(-conv.y_zero_point), high = static_cast<float>(255 - conv.y_zero_point);
  for (int64_t i = 0; i < kQffnRows; ++i) {
    if (out[i] == nullptr) continue;
    for (int64_t n = 0; n < conv.cout; ++n) {
      int32_t acc = 0;
      for (int64_t t = 0; t < conv.taps; ++t) {
        const uint8_t* row = a + i * conv.c + conv.offsets[t];
        for (int64_t ci = 0; ci < conv.c; ++ci) acc += row[ci] * weight(conv, t * conv.c + ci, n);
      }
      // The int32 add wraps as vpaddd does (the rewrite keeps the bias within int32, the depth keeps the sums).
      const int32_t sum = static_cast<int32_t>(static_cast<uint32_t>(acc) + static_cast<uint32_t>(conv.bias[n]));
      float v = static_cast<float>(sum) * conv.scale[n];
      v = v > low ? v : low;  // NaN -> low, as max_ps with NaN first (a non-finite scale: the rewrite declines)
      v = v < high ? v : high;
      out[i][n] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(v)) + conv.y_zero_point);
    }
  }
}

// Task `index`: block index % blocks of image index / blocks. Runs on a pool thread, through C: no exception
// may leave it; the op reports a failure after ParallelFor.
void conv_block(void* data, size_t index) {
  Plan& p = *static_cast<Plan*>(data);
  const m2fp::QConv& conv = p.conv;
  const int64_t image = static_cast<int64_t>(index) / p.blocks, q0 = static_cast<int64_t>(index) % p.blocks * kQffnRows;
  try {
    thread_local std::vector<uint8_t> pad;
    thread_local std::vector<int32_t> acc;
    const uint8_t* a = p.x + (image * p.hp * p.wp + q0) * conv.c;
    if (p.in_place && q0 + kQffnRows > p.positions) {  // the last, short block of an unpadded input
      pad.assign(static_cast<size_t>(kQffnRows * conv.c), 0);
      std::memcpy(pad.data(), a, static_cast<size_t>((p.positions - q0) * conv.c));
      a = pad.data();
    }
    uint8_t* out[kQffnRows];
    for (int64_t i = 0; i < kQffnRows; ++i) {
      const int64_t q = q0 + i, row = q / p.wp, col = q % p.wp;
      out[i] = q < p.positions && col < p.wo ? p.y + ((image * p.ho + row) * p.wo + col) * conv.cout : nullptr;
    }
    if (p.kernel == m2fp::Int8Kernel::kGeneric) {
      block_generic(conv, a, out);
      return;
    }
#if defined(M2FP_QFFN_X86)
    if (acc.size() < static_cast<size_t>(kQffnRows * kQffnColumns)) acc.resize(kQffnRows * kQffnColumns);
    const bool amx = p.kernel == m2fp::Int8Kernel::kAmx;
    if (amx) m2fp_qffn_amx_begin();
    m2fp_qconv_block_x86(conv, a, out, acc.data(), amx);
    if (amx) m2fp_qffn_amx_end();
#endif
  } catch (...) {  // std::bad_alloc from the buffers
    p.failed = true;
  }
}

// Padded row `index` (image index / hp, row index % hp): the input's row between x_zero_point bytes, or all
// x_zero_point above and below it.
struct Padding {
  const uint8_t* x;
  uint8_t* padded;
  int64_t h, w, c, hp, wp, top, left;
  uint8_t zero_point;
};

void pad_row(void* data, size_t index) {
  const Padding& p = *static_cast<const Padding*>(data);
  const int64_t image = static_cast<int64_t>(index) / p.hp, r = static_cast<int64_t>(index) % p.hp - p.top;
  uint8_t* dst = p.padded + static_cast<int64_t>(index) * p.wp * p.c;
  if (r < 0 || r >= p.h) {
    std::memset(dst, p.zero_point, static_cast<size_t>(p.wp * p.c));
    return;
  }
  std::memset(dst, p.zero_point, static_cast<size_t>(p.left * p.c));
  std::memcpy(dst + p.left * p.c, p.x + (image * p.h + r) * p.w * p.c, static_cast<size_t>(p.w * p.c));
  std::memset(dst + (p.left + p.w) * p.c, p.zero_point, static_cast<size_t>((p.wp - p.left - p.w) * p.c));
}

Ort::Status QConv(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                  const Ort::Custom::Tensor<uint8_t>& x_zero_point, const Ort::Custom::Tensor<int8_t>& tiles,
                  const Ort::Custom::Tensor<int32_t>& bias, const Ort::Custom::Tensor<float>& scale,
                  const Ort::Custom::Tensor<uint8_t>& y_zero_point, const Ort::Custom::Tensor<int64_t>& geometry,
                  Ort::Custom::Tensor<uint8_t>& y) {
  const char* op = "QConv";
  const std::vector<int64_t> xs = x.Shape(), bs = bias.Shape();
  if (xs.size() != 4) return fail(op, "x must be (N, H, W, C), not " + dims(xs));
  const int64_t n = xs[0], h = xs[1], w = xs[2], c = xs[3];
  if (c <= 0 || c % kQffnDepth != 0) return fail(op, "C must be a multiple of 64; x " + dims(xs));
  if (geometry.NumberOfElement() != 8) {
    return fail(op, "geometry must be 8 values (kh, kw, strides, pads top, left, bottom, right), not " +
                        dims(geometry.Shape()));
  }
  const int64_t* g = geometry.Data();
  const int64_t kh = g[0], kw = g[1], top = g[4], left = g[5], bottom = g[6], right = g[7];
  if (kh < 1 || kw < 1 || kh > kMaxKernel || kw > kMaxKernel) return fail(op, "kernel sizes must be 1 to 15");
  if (g[2] != 1 || g[3] != 1) return fail(op, "strides must be 1");
  for (int i = 4; i < 8; ++i) {
    if (g[i] < 0 || g[i] >= (i % 2 == 0 ? kh : kw)) return fail(op, "pads must be 0 to the kernel size - 1");
  }
  if (bs.size() != 1 || bs[0] <= 0 || bs[0] % kQffnColumns != 0) {
    return fail(op, "bias must be (Cout) with Cout a multiple of 32, not " + dims(bs));
  }
  const int64_t cout = bs[0], depth = kh * kw * c;
  if (scale.Shape() != bs) return fail(op, "scale must be (Cout) = " + dims(bs) + ", not " + dims(scale.Shape()));
  if (depth > kMaxDepth) return fail(op, "kh x kw x C must be at most 65536 (int32 sums)");
  if (tiles.NumberOfElement() != depth * cout) {
    return fail(op, "tiles must hold kh x kw x C x Cout = " + std::to_string(depth * cout) + " weights, not " +
                        std::to_string(tiles.NumberOfElement()));
  }
  if (!scalar(x_zero_point.Shape()) || !scalar(y_zero_point.Shape())) {
    return fail(op, "x_zero_point and y_zero_point must be scalars");
  }
  const int64_t hp = h + top + bottom, wp = w + left + right, ho = hp - kh + 1, wo = wp - kw + 1;
  if (ho < 1 || wo < 1) return fail(op, "x " + dims(xs) + " is smaller than the kernel");
  uint8_t* out = y.Allocate({n, ho, wo, cout});
  if (n == 0) return Ort::Status{nullptr};

  std::vector<int64_t> offsets(static_cast<size_t>(kh * kw));
  for (int64_t ky = 0; ky < kh; ++ky) {
    for (int64_t kx = 0; kx < kw; ++kx) offsets[ky * kw + kx] = (ky * wp + kx) * c;
  }
  const bool in_place = kh == 1 && kw == 1 && top + left + bottom + right == 0;
  // The padded input, written once (pad_row fills every row); slack after the last image, where the last block's
  // dropped positions read up to 30 + kw rows.
  std::unique_ptr<uint8_t[]> padded;
  Ort::KernelContext ctx(context);
  if (!in_place) {
    const size_t size = static_cast<size_t>(n * hp * wp * c), slack = static_cast<size_t>((kQffnRows + kw) * c);
    padded.reset(new uint8_t[size + slack]);
    std::memset(padded.get() + size, *x_zero_point.Data(), slack);
    Padding pad{x.Data(), padded.get(), h, w, c, hp, wp, top, left, *x_zero_point.Data()};
    ctx.ParallelFor(pad_row, static_cast<size_t>(n * hp), 0, &pad);
  }
  // Without padding, the images' rows follow one another: one image of n x h rows.
  const int64_t images = in_place ? 1 : n, rows_out = in_place ? n * ho : ho;
  Plan plan{{tiles.Data(), bias.Data(), scale.Data(), offsets.data(), kh * kw, c, cout, *y_zero_point.Data()},
            in_place ? x.Data() : padded.get(), out, images, in_place ? n * hp : hp, wp, rows_out, wo,
            rows_out * wp, (rows_out * wp + kQffnRows - 1) / kQffnRows, in_place, m2fp::int8_kernel()};
  ctx.ParallelFor(conv_block, static_cast<size_t>(images * plan.blocks), 0, &plan);
  if (plan.failed) return Ort::Status("ai.m2fp::QConv: out of memory for its buffers", ORT_FAIL);
  return Ort::Status{nullptr};
}

Ort::Status QConvChecked(OrtKernelContext* context, const Ort::Custom::Tensor<uint8_t>& x,
                         const Ort::Custom::Tensor<uint8_t>& x_zero_point, const Ort::Custom::Tensor<int8_t>& tiles,
                         const Ort::Custom::Tensor<int32_t>& bias, const Ort::Custom::Tensor<float>& scale,
                         const Ort::Custom::Tensor<uint8_t>& y_zero_point,
                         const Ort::Custom::Tensor<int64_t>& geometry, Ort::Custom::Tensor<uint8_t>& y) {
  return m2fp::checked("QConv", [&] { return QConv(context, x, x_zero_point, tiles, bias, scale, y_zero_point, geometry, y); });
}

}  // namespace

void m2fp_add_qconv_op(Ort::CustomOpDomain& domain, std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& keep) {
  keep.emplace_back(Ort::Custom::CreateLiteCustomOp("QConv", "CPUExecutionProvider", QConvChecked));
  domain.Add(keep.back().get());
}
