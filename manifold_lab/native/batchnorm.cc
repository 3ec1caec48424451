// The per-channel reductions of training-mode BatchNorm on float32 [..., C] tensors (every
// leading axis is a pixel), for XLA:CPU as XLA FFI custom calls.
//
// Why: XLA:CPU reduces each channel sum in its own pass, and in the backward pass it first writes
// the masked gradient out as a full-size tensor to feed its two reductions. These kernels read
// their inputs once for both sums.
//
//   manifold_bn_moments:   (mean, var) of x per channel, var = E[x^2] - E[x]^2 (Flax's formula)
//   manifold_bn_grad_sums: (sum gz, sum gz * x) per channel, gz = g where lo < x * a + b < hi
//                          (the activation passes gradient there), else 0; masked = 0: gz = g
//
// The pixels are cut into a number of chunks fixed by the tensor's size, not by the thread count;
// each chunk sums blocks of 256 pixels in float32 and adds them in float64, and the chunks are
// added in order in float64, so the results do not depend on scheduling.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using manifold::KeepInside;
using manifold::kLanes;
using manifold::Load;
using manifold::ParallelFor;
using manifold::SumInOrder;
using manifold::Store;
using manifold::Vec;

// At least 64 Ki elements per chunk, at most 64 chunks.
int64_t Chunks(int64_t pixels, int64_t channels) {
  return std::clamp<int64_t>(pixels * channels >> 16, 1, std::min<int64_t>(64, pixels));
}

// Pixels summed in float32 before they are added to a chunk's float64 sums: bounds the rounding
// of long runs of float32 additions (a whole chunk in float32 was measurably less accurate than
// XLA's reductions).
constexpr int64_t kBlockPixels = 256;

// totals[s * C + c] = the sum over chunks of their partial sums, where rows(begin, end, partial)
// adds the contributions of pixels [begin, end) to partial[kSums * C].
template <int kSums, typename Rows>
std::vector<double> ReduceRows(ffi::ThreadPool& pool, int64_t pixels, int64_t channels, const Rows& rows) {
  const int64_t chunks = Chunks(pixels, channels), width = kSums * channels;
  std::vector<double> partial(chunks * width, 0.0);
  ParallelFor(pool, chunks, [&](int64_t t) {
    std::vector<float> block(width);
    double* sums = partial.data() + t * width;
    for (int64_t b = pixels * t / chunks, end = pixels * (t + 1) / chunks; b < end; b += kBlockPixels) {
      std::fill(block.begin(), block.end(), 0.0f);
      rows(b, std::min(end, b + kBlockPixels), block.data());
      for (int64_t e = 0; e < width; ++e) sums[e] += block[e];
    }
  });
  return SumInOrder(partial, chunks, width);
}

// Pixels and channels of x [..., C]; false for a scalar or zero channels.
bool Shape(const ffi::Buffer<ffi::F32>& x, int64_t* pixels, int64_t* channels) {
  const auto d = x.dimensions();
  if (d.size() < 1 || d.back() == 0) return false;
  *channels = d.back();
  *pixels = static_cast<int64_t>(x.element_count()) / *channels;
  return true;
}

ffi::Error Moments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> var) {
  int64_t pixels = 0, c = 0;
  if (!Shape(x, &pixels, &c) || mean->element_count() != static_cast<size_t>(c) ||
      var->element_count() != static_cast<size_t>(c)) {
    return ffi::Error::InvalidArgument("bn_moments: expected x [..., C], mean [C] and var [C]");
  }
  const float* xp = x.typed_data();
  const auto totals = ReduceRows<2>(pool, pixels, c, [=](int64_t begin, int64_t end, float* sums) {
    float* sq = sums + c;
    for (int64_t p = begin; p < end; ++p) {
      const float* row = xp + p * c;
      int64_t k = 0;
      for (; k + kLanes <= c; k += kLanes) {
        const Vec v = Load(row + k);
        Store(sums + k, Load(sums + k) + v);
        Store(sq + k, Load(sq + k) + v * v);
      }
      for (; k < c; ++k) {
        sums[k] += row[k];
        sq[k] += row[k] * row[k];
      }
    }
  });
  for (int64_t k = 0; k < c; ++k) {
    const double m = totals[k] / pixels;
    mean->typed_data()[k] = static_cast<float>(m);
    var->typed_data()[k] = static_cast<float>(std::max(0.0, totals[c + k] / pixels - m * m));
  }
  return ffi::Error::Success();
}

// The rows of GradSums: sums[0 .. C) += gz, sums[C .. 2C) += gz * x, kPixels pixels at a time
// (their terms added in registers before the one read-modify-write of the sums).
template <bool Masked>
struct GradSumRows {
  static constexpr int kPixels = 4;
  const float *x, *g, *a, *b;
  int64_t c;
  float lo, hi;

  template <int P>
  void Pixels(int64_t p, float* sums) const {
    float* sx = sums + c;
    int64_t k = 0;
    for (; k + kLanes <= c; k += kLanes) {
      Vec s = {}, t = {};
      for (int i = 0; i < P; ++i) {
        const Vec v = Load(x + (p + i) * c + k);
        Vec gz = Load(g + (p + i) * c + k);
        if constexpr (Masked) gz = KeepInside(gz, v * Load(a + k) + Load(b + k), lo, hi);
        s += gz;
        t += gz * v;
      }
      Store(sums + k, Load(sums + k) + s);
      Store(sx + k, Load(sx + k) + t);
    }
    for (; k < c; ++k) {
      for (int i = 0; i < P; ++i) {
        const float v = x[(p + i) * c + k];
        float gz = g[(p + i) * c + k];
        if constexpr (Masked) {
          const float z = v * a[k] + b[k];
          gz = (z > lo && z < hi) ? gz : 0.0f;
        }
        sums[k] += gz;
        sx[k] += gz * v;
      }
    }
  }

  void operator()(int64_t begin, int64_t end, float* sums) const {
    int64_t p = begin;
    for (; p + kPixels <= end; p += kPixels) Pixels<kPixels>(p, sums);
    for (; p < end; ++p) Pixels<1>(p, sums);
  }
};

ffi::Error GradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                    ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::ResultBuffer<ffi::F32> sum_g, ffi::ResultBuffer<ffi::F32> sum_gx,
                    int64_t masked, float lo, float hi) {
  int64_t pixels = 0, c = 0;
  const bool shaped = Shape(x, &pixels, &c);
  const size_t cs = static_cast<size_t>(c);
  if (!shaped || g.element_count() != x.element_count() || a.element_count() != cs ||
      b.element_count() != cs || sum_g->element_count() != cs || sum_gx->element_count() != cs) {
    return ffi::Error::InvalidArgument(
        "bn_grad_sums: expected x and g [..., C] of one shape, a, b, and both sums [C]");
  }
  const float *xp = x.typed_data(), *gp = g.typed_data(), *ap = a.typed_data(), *bp = b.typed_data();
  const auto totals = masked ? ReduceRows<2>(pool, pixels, c, GradSumRows<true>{xp, gp, ap, bp, c, lo, hi})
                             : ReduceRows<2>(pool, pixels, c, GradSumRows<false>{xp, gp, ap, bp, c, lo, hi});
  for (int64_t k = 0; k < c; ++k) {
    sum_g->typed_data()[k] = static_cast<float>(totals[k]);
    sum_gx->typed_data()[k] = static_cast<float>(totals[c + k]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldBatchNormMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldBatchNormGradSums, GradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("masked")
                                  .Attr<float>("lo")
                                  .Attr<float>("hi"));
