// Dense k x k convolution with few input channels (the stem: 3 x 3, 3 -> 32 channels) on NHWC
// float32 tensors for XLA:CPU, as an XLA FFI custom call.
//
// Why: as one matmul it needs the k * k shifted windows of the image stacked on the channel axis
// (im2col), a copy nine times the size of the image, written and read again. This kernel reads
// the image where it lies: for each output pixel, every tap value is broadcast and multiplied
// into the output channels, 16 at a time, with 4 pixels x 32 channels of accumulators in
// registers.
//
//   manifold_conv_fwd: y[n, oh, ow, :] = sum over (i, j, ci) of
//       x[n, oh * stride + i - pad_top, ow * stride + j - pad_left, ci] * w[i, j, ci, :]
//       (x [N, H, W, Cin], w [k, k, Cin, Cout], y [N, OH, OW, Cout]; zero outside the input)
//   manifold_conv_wgrad: dw[i, j, ci, :] = sum over (n, oh, ow) of
//       x[n, oh * stride + i - pad_top, ow * stride + j - pad_left, ci] * dy[n, oh, ow, :],
//       summed per fixed chunk of output rows (registers for the 3 x 3 x 3 case), the chunks
//       added in order in float64: deterministic.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using manifold::kLanes;
using manifold::Load;
using manifold::ParallelFor;
using manifold::RowsPerTask;
using manifold::SumInOrder;
using manifold::Store;
using manifold::Vec;

struct ConvGeometry {
  int64_t n, h, w, cin, k, oh, ow, cout, stride, pad_top, pad_left;
};

// Output columns [m, m + P) of output row (n, oh), output channels [c0, c0 + V * 16). Checked:
// skip taps outside the row.
template <int V, int P, bool Checked>
inline void ConvBlock(const ConvGeometry& g, const float* x, const float* w, float* yrow, int64_t n,
                      int64_t oh, int64_t m, int64_t c0) {
  Vec acc[P][V] = {};
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t r = oh * g.stride + i - g.pad_top;
    if (r < 0 || r >= g.h) continue;
    const float* xrow = x + (n * g.h + r) * g.w * g.cin;
    for (int64_t j = 0; j < g.k; ++j) {
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        Vec wv[V];
        for (int v = 0; v < V; ++v) wv[v] = Load(w + ((i * g.k + j) * g.cin + ci) * g.cout + c0 + v * kLanes);
        for (int p = 0; p < P; ++p) {
          const int64_t col = (m + p) * g.stride + j - g.pad_left;
          if (Checked && (col < 0 || col >= g.w)) continue;
          const float value = xrow[col * g.cin + ci];
          for (int v = 0; v < V; ++v) acc[p][v] += value * wv[v];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < V; ++v) Store(yrow + (m + p) * g.cout + c0 + v * kLanes, acc[p][v]);
  }
}

// The same for one output pixel and the last output channels [c0, cout) (fewer than 16).
inline void ConvTail(const ConvGeometry& g, const float* x, const float* w, float* yrow, int64_t n,
                     int64_t oh, int64_t m, int64_t c0) {
  for (int64_t c = c0; c < g.cout; ++c) {
    float acc = 0.0f;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t r = oh * g.stride + i - g.pad_top;
      if (r < 0 || r >= g.h) continue;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t col = m * g.stride + j - g.pad_left;
        if (col < 0 || col >= g.w) continue;
        for (int64_t ci = 0; ci < g.cin; ++ci) {
          acc += x[((n * g.h + r) * g.w + col) * g.cin + ci] * w[((i * g.k + j) * g.cin + ci) * g.cout + c];
        }
      }
    }
    yrow[m * g.cout + c] = acc;
  }
}

// Output columns [m_begin, m_end) of one row, P at a time (the rest one at a time), all channels.
template <int P, bool Checked>
void ConvColumns(const ConvGeometry& g, const float* x, const float* w, float* yrow, int64_t n,
                 int64_t oh, int64_t m_begin, int64_t m_end) {
  int64_t m = m_begin;
  for (; m + P <= m_end; m += P) {
    int64_t c0 = 0;
    for (; c0 + 2 * kLanes <= g.cout; c0 += 2 * kLanes) ConvBlock<2, P, Checked>(g, x, w, yrow, n, oh, m, c0);
    if (c0 + kLanes <= g.cout) ConvBlock<1, P, Checked>(g, x, w, yrow, n, oh, m, c0), c0 += kLanes;
    if (c0 < g.cout) {
      for (int p = 0; p < P; ++p) ConvTail(g, x, w, yrow, n, oh, m + p, c0);
    }
  }
  if (m < m_end) ConvColumns<1, true>(g, x, w, yrow, n, oh, m, m_end);
}

void ConvRow(const ConvGeometry& g, const float* x, const float* w, float* y, int64_t n, int64_t oh) {
  float* yrow = y + (n * g.oh + oh) * g.ow * g.cout;
  // interior columns: 0 <= m * stride - pad_left and m * stride - pad_left + k - 1 <= w - 1
  const int64_t lo = std::min(g.ow, (g.pad_left + g.stride - 1) / g.stride);
  const int64_t hi = std::max(lo, std::min(g.ow, g.w - g.k + g.pad_left < 0 ? 0 : (g.w - g.k + g.pad_left) / g.stride + 1));
  ConvColumns<1, true>(g, x, w, yrow, n, oh, 0, lo);
  ConvColumns<4, false>(g, x, w, yrow, n, oh, lo, hi);
  ConvColumns<1, true>(g, x, w, yrow, n, oh, hi, g.ow);
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || wd[0] != wd[1] || wd[2] != xd[3] ||
      yd[0] != xd[0] || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument(
        "conv: expected x [N,H,W,Cin], w [k,k,Cin,Cout] and output [N,OH,OW,Cout]");
  }
  if (stride < 1 || pad_top < 0 || pad_left < 0) {
    return ffi::Error::InvalidArgument("conv: stride must be >= 1 and pads >= 0");
  }
  const ConvGeometry g{xd[0], xd[1], xd[2], xd[3], wd[0], yd[1], yd[2], wd[3], stride, pad_top, pad_left};
  const int64_t rows = g.n * g.oh;
  const int64_t per = RowsPerTask(rows, g.ow * g.cout);
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, (rows + per - 1) / per, [&](int64_t t) {
    for (int64_t row = t * per; row < std::min(rows, (t + 1) * per); ++row) ConvRow(g, xp, wp, yp, row / g.oh, row % g.oh);
  });
  return ffi::Error::Success();
}

// partial[(i * k + j) * cin + ci, c] += x[.., col(m, j), ci] * dy[m, c] for output pixel m of a
// row, every valid tap and channels [c0, cout); rows[i]: the input row of tap row i or null.
void WgradPixel(const ConvGeometry& g, const float* const* rows, const float* dyrow, int64_t m,
                int64_t c0, float* partial) {
  const float* gp = dyrow + m * g.cout;
  for (int64_t i = 0; i < g.k; ++i) {
    if (!rows[i]) continue;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t col = m * g.stride + j - g.pad_left;
      if (col < 0 || col >= g.w) continue;
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        const float value = rows[i][col * g.cin + ci];
        float* pp = partial + ((i * g.k + j) * g.cin + ci) * g.cout;
        int64_t c = c0;
        for (; c + kLanes <= g.cout; c += kLanes) Store(pp + c, Load(pp + c) + value * Load(gp + c));
        for (; c < g.cout; ++c) pp[c] += value * gp[c];
      }
    }
  }
}

// The interior pixels [lo, hi) of one output row (every tap inside), 16 output channels from c0:
// the K * K * CIN sums in registers across the row.
template <int K, int CIN>
void WgradInterior(const ConvGeometry& g, const float* const* rows, const float* dyrow, int64_t lo,
                   int64_t hi, int64_t c0, float* partial) {
  Vec acc[K * K * CIN] = {};
  for (int64_t m = lo; m < hi; ++m) {
    const Vec gv = Load(dyrow + m * g.cout + c0);
    const int64_t col0 = m * g.stride - g.pad_left;
    for (int i = 0; i < K; ++i) {
      if (!rows[i]) continue;
      const float* xp = rows[i] + col0 * CIN;
      for (int q = 0; q < K * CIN; ++q) acc[i * K * CIN + q] += xp[q] * gv;  // (j, ci) contiguous
    }
  }
  for (int t = 0; t < K * K * CIN; ++t) {
    float* pp = partial + t * g.cout + c0;
    Store(pp, Load(pp) + acc[t]);
  }
}

void WgradRow(const ConvGeometry& g, const float* x, const float* dy, int64_t n, int64_t oh,
              float* partial) {
  const float* rows[8] = {};  // k <= 8
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t r = oh * g.stride + i - g.pad_top;
    rows[i] = (r < 0 || r >= g.h) ? nullptr : x + (n * g.h + r) * g.w * g.cin;
  }
  const float* dyrow = dy + (n * g.oh + oh) * g.ow * g.cout;
  int64_t lo = 0, hi = 0;
  if (g.k == 3 && g.cin == 3) {
    lo = std::min(g.ow, (g.pad_left + g.stride - 1) / g.stride);
    hi = std::max(lo, std::min(g.ow, g.w - g.k + g.pad_left < 0 ? 0 : (g.w - g.k + g.pad_left) / g.stride + 1));
    for (int64_t c0 = 0; c0 + kLanes <= g.cout; c0 += kLanes) WgradInterior<3, 3>(g, rows, dyrow, lo, hi, c0, partial);
    const int64_t tail = g.cout / kLanes * kLanes;  // the interior's last channels
    if (tail < g.cout) {
      for (int64_t m = lo; m < hi; ++m) WgradPixel(g, rows, dyrow, m, tail, partial);
    }
  }
  for (int64_t m = 0; m < lo; ++m) WgradPixel(g, rows, dyrow, m, 0, partial);
  for (int64_t m = hi; m < g.ow; ++m) WgradPixel(g, rows, dyrow, m, 0, partial);
}

ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || wd[0] != wd[1] || wd[0] > 8 ||
      wd[2] != xd[3] || gd[0] != xd[0] || gd[3] != wd[3]) {
    return ffi::Error::InvalidArgument(
        "conv_wgrad: expected x [N,H,W,Cin], dy [N,OH,OW,Cout] and dw [k,k,Cin,Cout], k <= 8");
  }
  if (stride < 1 || pad_top < 0 || pad_left < 0) {
    return ffi::Error::InvalidArgument("conv_wgrad: stride must be >= 1 and pads >= 0");
  }
  const ConvGeometry g{xd[0], xd[1], xd[2], xd[3], wd[0], gd[1], gd[2], wd[3], stride, pad_top, pad_left};
  const int64_t rows = g.n * g.oh, chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
  const int64_t elems = g.k * g.k * g.cin * g.cout;
  std::vector<float> partial(chunks * elems, 0.0f);
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  ParallelFor(pool, chunks, [&](int64_t t) {
    for (int64_t row = rows * t / chunks; row < rows * (t + 1) / chunks; ++row) {
      WgradRow(g, xp, gp, row / g.oh, row % g.oh, partial.data() + t * elems);
    }
  });
  const std::vector<double> total = SumInOrder(partial, chunks, elems);
  for (int64_t e = 0; e < elems; ++e) dw->typed_data()[e] = static_cast<float>(total[e]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldConvWeightGrad, ConvWeightGrad, manifold::StridedConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldConvForward, ConvForward, manifold::StridedConvBinding());
