// A whole MobileNetV2 inverted-residual block for inference in one XLA FFI call (the paper's
// Section 5 evaluation as a kernel), float32 NHWC, XLA:CPU.
//
// Why: the unfused block writes the expanded tensor (t times the block input) to memory after
// the expansion's 1x1 and reads it back in the depthwise kernel, and writes the depthwise output
// for the projection's 1x1. Here each task takes a range of output rows (a strip of one image, or
// several small images) and, one slice of the expanded channels at a time (the paper's t-way
// split, sized so that the slice's weights and rows stay in the core's L2 cache), computes the
// expansion of the input rows the range reads (the halo included) into a ring of three rows, the
// 3x3 depthwise of each output row from that ring, and multiplies a few such rows at a time into
// the range's projection accumulator (its rows of the output). The expanded tensor and the
// depthwise output only ever exist as cache-sized tiles; the block's output is the only write.
// With fewer tasks than threads (batch 1), the expanded channels are shared out between tasks
// whose partial projections are added at the end.
//
// Every BatchNorm comes as a per-channel (scale, bias) pair from its running statistics, applied
// to the product in registers (so that no folded copy of the weights is ever made):
//   e = clamp_e((x @ w_expand) * s_e + b_e)           expand_mode 0 (the 1x1 expansion)
//   e = clamp_e(x * s_e + b_e)                         expand_mode 1 (no expansion, t = 1: the
//                                                      previous layer's BatchNorm, or identity)
//   d = clamp_d(depthwise3x3(e) * s_d + b_d)  (+ e     residual 2, "inner": stride 1 only)
//   y = clamp_p((d @ w_project) * s_p + b_p)  (+ x     residual 1, the bottleneck shortcut)
// The expanded width E of the expanded-side arrays is a multiple of 16 (the caller pads it with
// zeros where it is not: padded channels are then zero and add nothing). Pixels
// of the depthwise input outside the image are zero (padding after the expansion's activation,
// as in the unfused network).
//
// Matrix products: gemm_tiles.h; the strips, slices and rows: block_strips.h.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "block_strips.h"
#include "common.h"

namespace {

using manifold::ParallelFor;
using namespace manifold::strips;

// y = clamp_p(acc * s_p + b_p) (+ x) on `pixels` pixels from pixel index `first`, acc read from
// `acc` (the strip's accumulator) plus the partial sums of the other groups.
void Finish(const Block& b, float* acc, const std::vector<float>& partial, int64_t first, int64_t pixels) {
  const __m512 lo = _mm512_set1_ps(b.p_lo), hi = _mm512_set1_ps(b.p_hi);
  const int64_t out_elems = b.n * b.oh * b.ow * b.cout;
  const int64_t extra = static_cast<int64_t>(partial.size()) / std::max<int64_t>(1, out_elems);
  for (int64_t q = 0; q < pixels; ++q) {
    float* row = acc + q * b.cout;
    const int64_t at = (first + q) * b.cout;
    for (int64_t c = 0; c < b.cout; c += 16) {
      const __mmask16 m = TailMask(b.cout - c);
      __m512 v = _mm512_maskz_loadu_ps(m, row + c);
      for (int64_t g = 0; g < extra; ++g) {
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, partial.data() + g * out_elems + at + c));
      }
      v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, b.sp + c), _mm512_maskz_loadu_ps(m, b.bp + c));
      v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      if (b.residual == 1) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b.x + at + c));
      _mm512_mask_storeu_ps(b.y + at + c, m, v);
    }
  }
}

// Task rows [g0, g1) of the output (row g: image g / oh, row g % oh), for one group of expanded
// channels: the projection, summed over the group's channel slices, into acc (those rows of y
// for group 0, of the group's partial buffer otherwise). Each slice's weights are read from
// the cache for every row of the task, across images where the task holds several.
void RunTask(const Block& b, const Plan& p, int64_t g0, int64_t g1, int64_t group, float* acc) {
  thread_local Scratch s;
  s.ring.resize(3 * p.padded_w * p.ec);
  s.zero.assign(p.padded_w * p.ec, 0.0f);
  s.d.resize(p.batch_rows * b.ow * p.ec);
  const int64_t slices = b.e / 16;
  const int64_t e0 = 16 * (slices * group / p.groups), e1 = 16 * (slices * (group + 1) / p.groups);
  const DwMap map{b.sd, b.bd, b.d_lo, b.d_hi, b.residual == 2};
  for (int64_t c0 = e0; c0 < e1; c0 += p.ec) {
    const int64_t ec = std::min(p.ec, e1 - c0);
    std::fill(s.tags, s.tags + 3, -1);
    for (int64_t g = g0; g < g1; g += p.batch_rows) {
      const int64_t count = std::min(p.batch_rows, g1 - g), m = count * b.ow;
      for (int64_t q = 0; q < count; ++q) {
        const float* rows[3];
        RowsFor(b, p, s, (g + q) / b.oh, (g + q) % b.oh, c0, ec, rows);
        DepthwiseRow(b, rows, c0, ec, map, s.d.data() + q * b.ow * ec);
      }
      float* out = acc + (g - g0) * b.ow * b.cout;  // the rows' accumulators are contiguous
      const float* w = b.wp + c0 * b.cout;
      if (c0 == e0) Gemm<Epi::kStore>(m, b.cout, ec, s.d.data(), ec, w, b.cout, out, b.cout);
      else Gemm<Epi::kAdd>(m, b.cout, ec, s.d.data(), ec, w, b.cout, out, b.cout);
    }
  }
}

void Run(ffi::ThreadPool& pool, const Block& b) {
  const Plan p = MakePlan(b, std::max<int64_t>(1, pool.num_threads()), true);
  const int64_t out_elems = b.n * b.oh * b.ow * b.cout;
  std::vector<float> partial((p.groups - 1) * out_elems);
  ParallelFor(pool, p.tasks * p.groups, [&](int64_t t) {
    const int64_t group = t % p.groups;
    int64_t g0, g1;
    TaskRows(b, p, t / p.groups, &g0, &g1);
    float* acc = (group == 0 ? b.y : partial.data() + (group - 1) * out_elems) + g0 * b.ow * b.cout;
    RunTask(b, p, g0, g1, group, acc);
    if (p.groups == 1) Finish(b, acc, partial, g0 * b.ow, (g1 - g0) * b.ow);  // while in cache
  });
  if (p.groups == 1) return;
  const int64_t pixels = b.n * b.oh * b.ow, chunks = std::min<int64_t>(pixels, 4 * pool.num_threads() + 1);
  ParallelFor(pool, chunks, [&](int64_t t) {
    const int64_t lo = pixels * t / chunks, hi = pixels * (t + 1) / chunks;
    Finish(b, b.y + lo * b.cout, partial, lo, hi - lo);
  });
}

ffi::Error Check(const Block& b, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd) {
  if (xd.size() != 4 || yd.size() != 4 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("fused block: expected x [N,H,W,C] and y [N,OH,OW,C]");
  }
  if (b.e % 16 != 0 || b.e < 16) return ffi::Error::InvalidArgument("fused block: E must be a multiple of 16");
  if (b.stride < 1 || b.pad_top < 0 || b.pad_left < 0 || b.pad_top > 2 || b.pad_left > 2) {
    return ffi::Error::InvalidArgument("fused block: stride >= 1 and pads in [0, 2]");
  }
  if (b.expand_mode == 1 && b.cin > b.e) return ffi::Error::InvalidArgument("fused block: C_in > E");
  if (b.residual == 1 && (b.cin != b.cout || b.oh != b.h || b.ow != b.w)) {
    return ffi::Error::InvalidArgument("fused block: the shortcut needs equal input and output shapes");
  }
  if (b.residual == 2 && (b.stride != 1 || b.oh != b.h || b.ow != b.w)) {
    return ffi::Error::InvalidArgument("fused block: the inner shortcut needs stride 1");
  }
  return ffi::Error::Success();
}

using Vector = ffi::Buffer<ffi::F32>;

ffi::Error FusedBlockForward(ffi::ThreadPool pool, Vector x, Vector we, Vector se, Vector be, Vector taps,
                             Vector sd, Vector bd, Vector wp, Vector sp, Vector bp, ffi::ResultBuffer<ffi::F32> y,
                             int64_t stride, int64_t pad_top, int64_t pad_left, int64_t expand_mode,
                             int64_t residual, float e_lo, float e_hi, float d_lo, float d_hi, float p_lo,
                             float p_hi) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  const int64_t e = static_cast<int64_t>(be.element_count());
  if (xd.size() != 4 || yd.size() != 4) return ffi::Error::InvalidArgument("fused block: 4-d tensors only");
  const Block b{xd[0], xd[1], xd[2], xd[3], e, yd[3], yd[1], yd[2], stride, pad_top, pad_left,
                expand_mode, residual, x.typed_data(), we.typed_data(), se.typed_data(), be.typed_data(),
                taps.typed_data(), sd.typed_data(), bd.typed_data(), wp.typed_data(), sp.typed_data(),
                bp.typed_data(), e_lo, e_hi, d_lo, d_hi, p_lo, p_hi, y->typed_data()};
  if (auto err = Check(b, xd, yd); err.failure()) return err;
  const size_t expand_rows = expand_mode == 0 ? b.cin : 1, ue = static_cast<size_t>(e);
  const size_t uc = static_cast<size_t>(b.cout);
  if (we.element_count() != expand_rows * ue || se.element_count() != ue || taps.element_count() != 9 * ue ||
      sd.element_count() != ue || bd.element_count() != ue || wp.element_count() != ue * uc ||
      sp.element_count() != uc || bp.element_count() != uc) {
    return ffi::Error::InvalidArgument("fused block: weight shapes do not match x, E and C_out");
  }
  Run(pool, b);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldFusedBlockForward, FusedBlockForward,
                              manifold::WithF32Rets<1>(
                                  manifold::WithF32Args<10>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("expand_mode")
                                  .Attr<int64_t>("residual")
                                  .Attr<float>("e_lo")
                                  .Attr<float>("e_hi")
                                  .Attr<float>("d_lo")
                                  .Attr<float>("d_hi")
                                  .Attr<float>("p_lo")
                                  .Attr<float>("p_hi"));
