// Depthwise k x k convolution on NHWC float32 tensors for XLA:CPU, as XLA FFI custom calls.
//
// Why: XLA:CPU runs a grouped convolution at under 1 GFLOP/s, and the pure-JAX shift form
// (manifold_lab/models/depthwise.py) pays for a padded copy of the input and, in the backward
// pass, for nine materialised tap windows. These kernels read each tensor once, handle the padding
// by bounds, vectorise over the channel axis (contiguous in NHWC) and split their rows over XLA's
// own intra-op thread pool.
//
// Geometry (shared by all of them): input x [N, H, W, C], taps [k, k, C] (HWIO without the unit
// input axis), output [N, OH, OW, C]; output pixel (oh, ow) reads input pixel
// (oh * stride + i - pad_top, ow * stride + j - pad_left) for tap (i, j); pixels outside the
// input are zero.
//
//   manifold_dw_fwd: y = depthwise(x, taps)
//   manifold_dw_fwd_fused: y = out(depthwise(in(x))) with per-channel affine + clamp maps:
//                    BatchNorm and ReLU6 folded into the kernel (inference: both maps from the
//                    running statistics; training: in from the batch statistics, out identity)
//   manifold_dw_bwd: (dx, dtaps) from (x, taps, dy), in one pass over the input rows. dx is
//                    gathered per input row (no write races); dtaps is summed per fixed chunk of
//                    input rows and the chunk partials are added in chunk order, so the result
//                    does not depend on thread scheduling.
//   manifold_dw_bwd_fused: training with the previous layer's BatchNorm (batch statistics) and
//                    clamp folded into the input: y = depthwise(clamp(x * scale + bias)). Returns
//                    the gradient of the pre-clamp value (masked where the clamp is flat), dtaps,
//                    and the channel sums of that gradient and of it times x, which BatchNorm's
//                    backward pass needs; the activation is never written out.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"

namespace {

using manifold::KeepInside;
using manifold::kLanes;
using manifold::Load;
using manifold::ParallelFor;
using manifold::RowsPerTask;
using manifold::SumInOrder;
using manifold::Store;
using manifold::StoreStream;
using manifold::StreamFence;
using manifold::kStreamBytes;
using manifold::Vec;

struct Geometry {
  int64_t n, h, w, c, k, oh, ow, stride, pad_top, pad_left;
};

// One valid tap of an output row: the source row it reads, its per-channel weights, and where
// output column m reads in that row (source column m * step + offset).
struct RowTap {
  const float* src;
  const float* weights;
  int64_t offset;
};

// A per-channel affine map followed by a clamp: y = min(max(x * scale + bias, lo), hi). It is
// how BatchNorm in inference mode and ReLU6 / ReLU / linear fold into the forward kernel.
struct Affine {
  const float* scale;
  const float* bias;
  float lo, hi;
};

inline Vec Apply(Vec v, Vec scale, Vec bias, Vec lo, Vec hi) {
  v = v * scale + bias;
  v = v < lo ? lo : v;  // lane-wise selects
  return v > hi ? hi : v;
}

inline Vec Apply(Vec v, Vec scale, Vec bias, float lo, float hi) {
  return Apply(v, scale, bias, Vec{} + lo, Vec{} + hi);
}

inline float Apply(float v, const Affine& a, int64_t c) {
  return std::min(std::max(v * a.scale[c] + a.bias[c], a.lo), a.hi);
}

// One row of a gather: output column m (m in [0, count)) is the sum over the taps of
// src[m * src_step + offset] * weights, written at out + m * out_step. Optional transforms:
// `in` on every source value (the previous layer's BatchNorm and activation, so that its
// output is never written out), `out` on every result (this layer's BatchNorm and activation).
// Padding stays zero after `in`, as in the unfused network.
struct Gather {
  const RowTap* taps;
  int ntaps;
  int fresh;  // the tap whose source row no earlier row read; it is prefetched ahead
  int64_t src_step, src_w, channels;
  float* out;
  int64_t out_step, count;
  const Affine* in;
  const Affine* out_map;
  bool stream;  // write with StoreStream
};

// P consecutive output columns from m0, channels c0 .. c0 + V * 16: P x V vector accumulators
// (P pixels of V * 16 channels) held in registers, so the multiply-adds of different pixels do
// not wait on each other. Checked: skip source columns outside [0, src_w).
template <int V, int P, bool Checked, bool In, bool Out>
inline void GatherBlock(const Gather& g, int64_t m0, int64_t c0) {
  Vec in_scale[V], in_bias[V];
  if constexpr (In) {
    for (int v = 0; v < V; ++v) {
      in_scale[v] = Load(g.in->scale + c0 + v * kLanes);
      in_bias[v] = Load(g.in->bias + c0 + v * kLanes);
    }
  }
  Vec acc[P][V] = {};
  const int64_t step = g.src_step * g.channels;  // floats between the sources of adjacent columns
  for (int t = 0; t < g.ntaps; ++t) {
    Vec w[V];
    for (int v = 0; v < V; ++v) w[v] = Load(g.taps[t].weights + c0 + v * kLanes);
    const int64_t col0 = m0 * g.src_step + g.taps[t].offset;
    const float* base = g.taps[t].src + col0 * g.channels + c0;
    for (int p = 0; p < P; ++p) {
      // one address computation per tap; the pixels are fixed steps from it
      if (Checked && (col0 + p * g.src_step < 0 || col0 + p * g.src_step >= g.src_w)) continue;
      const float* x = base + p * step;
      for (int v = 0; v < V; ++v) {
        Vec value = Load(x + v * kLanes);
        if constexpr (In) value = Apply(value, in_scale[v], in_bias[v], g.in->lo, g.in->hi);
        acc[p][v] += value * w[v];
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < V; ++v) {
      Vec result = acc[p][v];
      if constexpr (Out) {
        result = Apply(result, Load(g.out_map->scale + c0 + v * kLanes),
                       Load(g.out_map->bias + c0 + v * kLanes), g.out_map->lo, g.out_map->hi);
      }
      float* out = g.out + (m0 + p) * g.out_step + c0 + v * kLanes;
      if (g.stream) StoreStream(out, result);
      else Store(out, result);
    }
  }
}

// The same for the last channels [c0, channels) (fewer than 16), one at a time.
template <bool Checked, bool In, bool Out>
inline void GatherTail(const Gather& g, int64_t m, int64_t c0) {
  for (int64_t c = c0; c < g.channels; ++c) {
    float acc = 0.0f;
    for (int t = 0; t < g.ntaps; ++t) {
      const int64_t col = m * g.src_step + g.taps[t].offset;
      if (Checked && (col < 0 || col >= g.src_w)) continue;
      float value = g.taps[t].src[col * g.channels + c];
      if constexpr (In) value = Apply(value, *g.in, c);
      acc += value * g.taps[t].weights[c];
    }
    if constexpr (Out) acc = Apply(acc, *g.out_map, c);
    g.out[m * g.out_step + c] = acc;
  }
}

constexpr int kPrefetchBlocks = 4;

// All channels of output columns [m_begin, m_end), P pixels at a time.
template <int P, bool Checked, bool In, bool Out>
inline void GatherColumns(const Gather& g, int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m + P <= m_end; m += P) {
    if constexpr (!Checked) {
      const int64_t col = (m + kPrefetchBlocks * P) * g.src_step + g.taps[g.fresh].offset;
      if (col + P * g.src_step <= g.src_w) {
        const float* begin = g.taps[g.fresh].src + col * g.channels;
        const float* end = begin + P * g.src_step * g.channels;
        for (const float* q = begin; q < end; q += kLanes) __builtin_prefetch(q);
      }
    }
    int64_t c0 = 0;
    for (; c0 + 2 * kLanes <= g.channels; c0 += 2 * kLanes) {
      GatherBlock<2, P, Checked, In, Out>(g, m, c0);
    }
    if (c0 + kLanes <= g.channels) {
      GatherBlock<1, P, Checked, In, Out>(g, m, c0);
      c0 += kLanes;
    }
    if (c0 < g.channels) {
      for (int p = 0; p < P; ++p) GatherTail<Checked, In, Out>(g, m + p, c0);
    }
  }
}

// The whole row. Columns where every tap lands inside the source row take the unchecked,
// 4-pixel path; the edges take the checked one.
// A gather whose taps are three source rows of three adjacent columns each (the 3 x 3 kernel:
// the forward pass, and the input gradient at stride 1), as row r reading columns
// m * step + first[r] + d (d = 0, 1, 2) with weights[r][d].
struct Rows3x3 {
  const float* src[3];
  const float* weights[3][3];
  int64_t first[3];
};

bool AsRows3x3(const Gather& g, Rows3x3* rows) {
  if (g.ntaps != 9 || g.channels < kLanes) return false;
  for (int r = 0; r < 3; ++r) {
    const RowTap* t = g.taps + 3 * r;
    const int64_t first = std::min({t[0].offset, t[1].offset, t[2].offset});
    rows->src[r] = t[0].src;
    rows->first[r] = first;
    bool seen[3] = {false, false, false};
    for (int j = 0; j < 3; ++j) {
      const int64_t d = t[j].offset - first;
      if (t[j].src != t[0].src || d > 2 || seen[d]) return false;
      seen[d] = true;
      rows->weights[r][d] = t[j].weights;
    }
  }
  return true;
}

// Interior columns [m_begin, m_end) of a Rows3x3 gather with source step S, channels
// [c0, c0 + 16), P output columns at a time: every source column is loaded (and mapped by `in`)
// once and multiplied into each of the up to three outputs that read it, with the nine weights
// held in registers. The 3 x 3 kernel's loads per output vector drop from 9 to about 4 (S = 1).
template <int S, int P, bool In, bool Out>
inline void Interior3x3(const Gather& g, const Rows3x3& rows, int64_t m_begin, int64_t m_end, int64_t c0) {
  const int64_t c = g.channels;
  Vec w[3][3];
  for (int r = 0; r < 3; ++r) {
    for (int d = 0; d < 3; ++d) w[r][d] = Load(rows.weights[r][d] + c0);
  }
  // the maps in registers (loads through g.in / g.out_map would be repeated: stores may alias)
  Vec in_scale{}, in_bias{}, in_lo{}, in_hi{}, out_scale{}, out_bias{}, out_lo{}, out_hi{};
  if constexpr (In) {
    in_scale = Load(g.in->scale + c0), in_bias = Load(g.in->bias + c0);
    in_lo = Vec{} + g.in->lo, in_hi = Vec{} + g.in->hi;
  }
  if constexpr (Out) {
    out_scale = Load(g.out_map->scale + c0), out_bias = Load(g.out_map->bias + c0);
    out_lo = Vec{} + g.out_map->lo, out_hi = Vec{} + g.out_map->hi;
  }
  constexpr int kColumns = (P - 1) * S + 3;
  for (int64_t m = m_begin; m + P <= m_end; m += P) {
    Vec acc[P] = {};
    for (int r = 0; r < 3; ++r) {
      const float* src = rows.src[r] + (m * S + rows.first[r]) * c + c0;
      for (int q = 0; q < kColumns; ++q) {
        Vec value = Load(src + q * c);
        if constexpr (In) value = Apply(value, in_scale, in_bias, in_lo, in_hi);
        for (int d = 0; d < 3; ++d) {  // output p reads column q = p * S + d
          if ((q - d) % S == 0 && q - d >= 0 && (q - d) / S < P) acc[(q - d) / S] += value * w[r][d];
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      Vec result = acc[p];
      if constexpr (Out) result = Apply(result, out_scale, out_bias, out_lo, out_hi);
      float* out = g.out + (m + p) * g.out_step + c0;
      if (g.stream) StoreStream(out, result);
      else Store(out, result);
    }
  }
}

// The interior [lo, hi) of a Rows3x3 gather: 16-channel blocks by Interior3x3, 8 (S = 1) or 4
// (S = 2) and then 1 output column at a time, and the last channels (fewer than 16) by GatherTail.
template <int S, bool In, bool Out>
void Interior3x3Row(const Gather& g, const Rows3x3& rows, int64_t lo, int64_t hi) {
  constexpr int kPixels = S == 1 ? 8 : 4;
  const int64_t mid = lo + (hi - lo) / kPixels * kPixels;
  int64_t c0 = 0;
  for (; c0 + kLanes <= g.channels; c0 += kLanes) {
    Interior3x3<S, kPixels, In, Out>(g, rows, lo, mid, c0);
    Interior3x3<S, 1, In, Out>(g, rows, mid, hi, c0);
  }
  if (c0 < g.channels) {
    for (int64_t m = lo; m < hi; ++m) GatherTail<false, In, Out>(g, m, c0);
  }
}

template <bool In, bool Out>
void GatherRowWith(const Gather& g) {
  int64_t lo = 0, hi = g.count;  // interior: 0 <= m * step + offset <= src_w - 1 for every tap
  for (int t = 0; t < g.ntaps; ++t) {
    const int64_t off = g.taps[t].offset;
    lo = std::max<int64_t>(lo, off >= 0 ? 0 : (-off + g.src_step - 1) / g.src_step);
    hi = std::min<int64_t>(hi, g.src_w - 1 - off < 0 ? 0 : (g.src_w - 1 - off) / g.src_step + 1);
  }
  if (g.ntaps == 0 || hi <= lo) {
    GatherColumns<1, true, In, Out>(g, 0, g.count);
    return;
  }
  GatherColumns<1, true, In, Out>(g, 0, lo);
  Rows3x3 rows;
  if ((g.src_step == 1 || g.src_step == 2) && AsRows3x3(g, &rows)) {
    if (g.src_step == 1) Interior3x3Row<1, In, Out>(g, rows, lo, hi);
    else Interior3x3Row<2, In, Out>(g, rows, lo, hi);
  } else {
    constexpr int kPixels = 4;
    const int64_t mid = lo + (hi - lo) / kPixels * kPixels;
    GatherColumns<kPixels, false, In, Out>(g, lo, mid);
    GatherColumns<1, false, In, Out>(g, mid, hi);
  }
  GatherColumns<1, true, In, Out>(g, hi, g.count);
}

void GatherRow(const Gather& g) {
  if (g.in && g.out_map) return GatherRowWith<true, true>(g);
  if (g.in) return GatherRowWith<true, false>(g);
  if (g.out_map) return GatherRowWith<false, true>(g);
  GatherRowWith<false, false>(g);
}

constexpr int kMaxTaps = 64;  // k <= 8

// Input rows with the input map applied, each computed once per task: a ring of k rows (row r
// in slot r mod k) holds the k-row window that consecutive output rows slide over. Without it
// the map would be applied to every value once per output row that reads it.
class MappedRows {
 public:
  MappedRows(const Geometry& g, const float* x, const Affine& in) : g_(g), x_(x), in_(in) {
    thread_local std::vector<float> buffer;  // one task at a time per thread
    buffer.resize(g.k * g.w * g.c);
    data_ = buffer.data();
    std::fill(tags_, tags_ + g.k, -1);
  }

  const float* Row(int64_t n, int64_t r) {
    const int64_t slot = r % g_.k, id = n * g_.h + r;
    float* dst = data_ + slot * g_.w * g_.c;
    if (tags_[slot] != id) {
      Map(x_ + id * g_.w * g_.c, dst);
      tags_[slot] = id;
    }
    return dst;
  }

 private:
  void Map(const float* src, float* dst) const {
    const Vec lo = Vec{} + in_.lo, hi = Vec{} + in_.hi;
    for (int64_t m = 0; m < g_.w; ++m) {
      int64_t c = 0;
      for (; c + kLanes <= g_.c; c += kLanes) {
        Store(dst + c, Apply(Load(src + c), Load(in_.scale + c), Load(in_.bias + c), lo, hi));
      }
      for (; c < g_.c; ++c) dst[c] = Apply(src[c], in_, c);
      src += g_.c;
      dst += g_.c;
    }
  }

  const Geometry& g_;
  const float* x_;
  const Affine& in_;
  float* data_;
  int64_t tags_[8];  // k <= 8
};

// One output row (n, oh) of the forward convolution, with the optional output map of Gather;
// mapped: the input rows with the input map applied (none: x itself).
void ForwardRow(const Geometry& g, const float* x, const float* taps, float* y, int64_t n,
                int64_t oh, MappedRows* mapped, const Affine* out, bool stream) {
  RowTap row_taps[kMaxTaps];
  int ntaps = 0;
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t r = oh * g.stride + i - g.pad_top;
    if (r < 0 || r >= g.h) continue;
    const float* src = mapped ? mapped->Row(n, r) : x + (n * g.h + r) * g.w * g.c;
    for (int64_t j = 0; j < g.k; ++j) {
      row_taps[ntaps++] = {src, taps + (i * g.k + j) * g.c, j - g.pad_left};
    }
  }
  // the bottom row (the last tap) is the one the previous output row did not read
  GatherRow(Gather{row_taps, ntaps, ntaps - 1, g.stride, g.w, g.c,
                   y + (n * g.oh + oh) * g.ow * g.c, g.c, g.ow, nullptr, out, stream});
}

// One input row (n, r) of the input gradient, gathered: input column col = rho + m * stride
// receives dy column m + (rho + pad_left - j) / stride from every tap j with
// (rho + pad_left - j) divisible by the stride, so each residue rho is one gather over m.
void InputGradRow(const Geometry& g, const float* taps, const float* dy, float* dx, int64_t n,
                  int64_t r, bool stream) {
  float* dxrow = dx + (n * g.h + r) * g.w * g.c;
  for (int64_t rho = 0; rho < std::min(g.stride, g.w); ++rho) {
    RowTap row_taps[kMaxTaps];
    int ntaps = 0;
    for (int64_t i = 0; i < g.k; ++i) {
      const int64_t qh = r + g.pad_top - i;
      if (qh < 0 || qh % g.stride != 0 || qh / g.stride >= g.oh) continue;
      const float* dyrow = dy + (n * g.oh + qh / g.stride) * g.ow * g.c;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t q = rho + g.pad_left - j;
        if (((q % g.stride) + g.stride) % g.stride != 0) continue;
        row_taps[ntaps++] = {dyrow, taps + (i * g.k + j) * g.c, q / g.stride};
      }
    }
    // the lowest dy row (the first tap) is the one the previous input row did not read
    GatherRow(Gather{row_taps, ntaps, 0, 1, g.ow, g.c, dxrow + rho * g.c, g.stride * g.c,
                     (g.w - rho + g.stride - 1) / g.stride, nullptr, nullptr, stream});
  }
}

// partial[c0 .. c0 + V * 16] += sum over ow in [lo, hi) of x[ow * stride + offset] * dy[ow],
// with P independent partial sums (ow = lo + p mod P) so that consecutive multiply-adds do not
// wait on each other.
template <int V, int P>
inline void TapGradBlock(const float* xrow, const float* dyrow, int64_t stride, int64_t offset,
                         int64_t channels, int64_t lo, int64_t hi, int64_t c0, float* partial) {
  Vec acc[P][V] = {};
  int64_t ow = lo;
  for (; ow + P <= hi; ow += P) {
    for (int p = 0; p < P; ++p) {
      const float* xp = xrow + ((ow + p) * stride + offset) * channels + c0;
      const float* gp = dyrow + (ow + p) * channels + c0;
      for (int v = 0; v < V; ++v) acc[p][v] += Load(xp + v * kLanes) * Load(gp + v * kLanes);
    }
  }
  for (; ow < hi; ++ow) {
    const float* xp = xrow + (ow * stride + offset) * channels + c0;
    const float* gp = dyrow + ow * channels + c0;
    for (int v = 0; v < V; ++v) acc[0][v] += Load(xp + v * kLanes) * Load(gp + v * kLanes);
  }
  for (int v = 0; v < V; ++v) {
    Vec sum = Load(partial + c0 + v * kLanes);
    for (int p = 0; p < P; ++p) sum += acc[p][v];
    Store(partial + c0 + v * kLanes, sum);
  }
}

// partial[k, k, C] += the tap gradients of input row (n, r), xrow: for every tap row i that reads
// it (from output row oh = (r + pad_top - i) / stride), every tap (i, j) gets the sum over the
// output columns of x[r, ow * stride + j - pad_left] * dy[oh, ow].
void TapGradInputRow(const Geometry& g, const float* xrow, const float* dy, float* partial, int64_t n,
                     int64_t r) {
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t qh = r + g.pad_top - i;
    if (qh < 0 || qh % g.stride != 0 || qh / g.stride >= g.oh) continue;
    const float* dyrow = dy + (n * g.oh + qh / g.stride) * g.ow * g.c;
    for (int64_t j = 0; j < g.k; ++j) {
      // output columns whose input column ow * stride + j - pad_left lies inside the row
      const int64_t off = j - g.pad_left;
      const int64_t lo = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
      const int64_t hi = std::min<int64_t>(g.ow, g.w - 1 - off < 0 ? 0 : (g.w - 1 - off) / g.stride + 1);
      float* pp = partial + (i * g.k + j) * g.c;
      int64_t c0 = 0;
      for (; c0 + 2 * kLanes <= g.c; c0 += 2 * kLanes) {
        TapGradBlock<2, 4>(xrow, dyrow, g.stride, off, g.c, lo, hi, c0, pp);
      }
      if (c0 + kLanes <= g.c) {
        TapGradBlock<1, 4>(xrow, dyrow, g.stride, off, g.c, lo, hi, c0, pp);
        c0 += kLanes;
      }
      for (; c0 < g.c; ++c0) {  // fewer than 16 channels left
        for (int64_t ow = lo; ow < hi; ++ow) {
          pp[c0] += xrow[(ow * g.stride + off) * g.c + c0] * dyrow[ow * g.c + c0];
        }
      }
    }
  }
}

// Input row (n, r) of the fused backward pass: the gradient da of the map's output, in place in
// dxrow, becomes dz = da where lo < z = x * scale + bias < hi (the clamp passes gradient), else 0;
// sums[0 .. C) += dz and sums[C .. 2C) += dz * x; mapped receives the map's output clamp(z).
void MaskRow(const Geometry& g, const float* xrow, const Affine& in, float* dxrow, float* sums,
             float* mapped, bool stream) {
  // the row's own sums first, then added to the chunk's: shorter runs of float32 additions
  thread_local std::vector<float> row_sums;
  row_sums.assign(2 * g.c, 0.0f);
  float* chunk_sums = sums;
  sums = row_sums.data();
  float* sums_x = sums + g.c;
  const Vec lo = Vec{} + in.lo, hi = Vec{} + in.hi;
  for (int64_t m = 0; m < g.w; ++m) {
    const float* xp = xrow + m * g.c;
    float* dp = dxrow + m * g.c;
    float* ap = mapped + m * g.c;
    int64_t c = 0;
    for (; c + kLanes <= g.c; c += kLanes) {
      const Vec v = Load(xp + c);
      const Vec z = v * Load(in.scale + c) + Load(in.bias + c);
      const Vec dz = KeepInside(Load(dp + c), z, in.lo, in.hi);
      if (stream) StoreStream(dp + c, dz);
      else Store(dp + c, dz);
      Store(sums + c, Load(sums + c) + dz);
      Store(sums_x + c, Load(sums_x + c) + dz * v);
      Store(ap + c, z < lo ? lo : (z > hi ? hi : z));
    }
    for (; c < g.c; ++c) {
      const float z = xp[c] * in.scale[c] + in.bias[c];
      const float dz = (z > in.lo && z < in.hi) ? dp[c] : 0.0f;
      dp[c] = dz;
      sums[c] += dz;
      sums_x[c] += dz * xp[c];
      ap[c] = std::min(std::max(z, in.lo), in.hi);
    }
  }
  for (int64_t e = 0; e < 2 * g.c; ++e) chunk_sums[e] += row_sums[e];
}

// The geometry of x [N, H, W, C], taps [k, k, C] and the output-sized tensor y [N, OH, OW, C].
ffi::Error CheckGeometry(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& taps,
                         ffi::Span<const int64_t> yd, int64_t stride, int64_t pad_top,
                         int64_t pad_left, Geometry* g) {
  const auto xd = x.dimensions();
  const auto td = taps.dimensions();
  if (xd.size() != 4 || td.size() != 3 || yd.size() != 4 || td[0] != td[1] || td[2] != xd[3] ||
      yd[0] != xd[0] || yd[3] != xd[3]) {
    return ffi::Error::InvalidArgument(
        "depthwise: expected x [N,H,W,C], taps [k,k,C] and output [N,OH,OW,C]");
  }
  if (td[0] * td[0] > kMaxTaps) {
    return ffi::Error::InvalidArgument("depthwise: kernels up to 8 x 8 only");
  }
  if (stride < 1 || pad_top < 0 || pad_left < 0) {
    return ffi::Error::InvalidArgument("depthwise: stride must be >= 1 and pads >= 0");
  }
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], td[0], yd[1], yd[2], stride, pad_top, pad_left};
  return ffi::Error::Success();
}

void RunForward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* taps,
                float* y, const Affine* in, const Affine* out) {
  const int64_t rows = g.n * g.oh;
  // long tasks: fewer rows read twice at task boundaries (and mapped twice with an input map)
  const int64_t per = RowsPerTask(rows, g.ow * g.c / 4);
  const bool stream = rows * g.ow * g.c * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
  ParallelFor(pool, (rows + per - 1) / per, [&](int64_t t) {
    std::optional<MappedRows> mapped;
    if (in) mapped.emplace(g, x, *in);
    for (int64_t row = t * per; row < std::min(rows, (t + 1) * per); ++row) {
      ForwardRow(g, x, taps, y, row / g.oh, row % g.oh, in ? &*mapped : nullptr, out, stream);
    }
    if (stream) StreamFence();
  });
}

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> taps, ffi::ResultBuffer<ffi::F32> y,
                            int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto yd = y->dimensions();
  Geometry g;
  if (auto err = CheckGeometry(x, taps, yd, stride, pad_top, pad_left, &g);
      err.failure()) {
    return err;
  }
  RunForward(pool, g, x.typed_data(), taps.typed_data(), y->typed_data(), nullptr, nullptr);
  return ffi::Error::Success();
}

// Inference: y = out(depthwise(in(x))) with the per-channel affine + clamp maps of Affine
// (in: the previous BatchNorm and activation, applied only when fuse_input is 1; out: this
// layer's BatchNorm and activation).
ffi::Error DepthwiseForwardFused(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> taps, ffi::Buffer<ffi::F32> in_scale,
                                 ffi::Buffer<ffi::F32> in_bias, ffi::Buffer<ffi::F32> out_scale,
                                 ffi::Buffer<ffi::F32> out_bias, ffi::ResultBuffer<ffi::F32> y,
                                 int64_t stride, int64_t pad_top, int64_t pad_left,
                                 int64_t fuse_input, float in_lo, float in_hi, float out_lo,
                                 float out_hi) {
  const auto yd = y->dimensions();
  Geometry g;
  if (auto err = CheckGeometry(x, taps, yd, stride, pad_top, pad_left, &g);
      err.failure()) {
    return err;
  }
  for (const auto* v : {&in_scale, &in_bias, &out_scale, &out_bias}) {
    if (v->element_count() != static_cast<size_t>(g.c)) {
      return ffi::Error::InvalidArgument("depthwise: scale and bias must have C elements");
    }
  }
  const Affine in{in_scale.typed_data(), in_bias.typed_data(), in_lo, in_hi};
  const Affine out{out_scale.typed_data(), out_bias.typed_data(), out_lo, out_hi};
  RunForward(pool, g, x.typed_data(), taps.typed_data(), y->typed_data(),
             fuse_input ? &in : nullptr, &out);
  return ffi::Error::Success();
}

// (dx, dtaps) of y = depthwise(in(x)), in: the optional input map. With it, dx is the masked
// gradient dz of the map's pre-clamp value (see MaskRow) and sums [2, C] receives the channel
// sums of dz and dz * x: what BatchNorm's backward pass needs besides x itself.
void RunBackward(ffi::ThreadPool& pool, const Geometry& g, const float* x, const float* taps,
                 const float* dy, float* dx, float* dtaps, const Affine* in, float* sums) {
  // One pass over the input rows: each row's input gradient, its mask and sums, and its tap
  // gradients, while the row of x and the rows of dy it meets are in cache. Partial sums per
  // chunk of rows; a fixed number of chunks (independent of the thread count), added in chunk
  // order, keeps dtaps and sums deterministic.
  const int64_t rows = g.n * g.h;
  const int64_t chunks = std::min<int64_t>(rows, 64);
  const int64_t tap_elems = g.k * g.k * g.c;
  const int64_t per_chunk = tap_elems + (in ? 2 * g.c : 0);
  std::vector<float> partial(chunks * per_chunk, 0.0f);
  // the final write of each dx row streams past the caches when dx is large
  const bool stream = rows * g.w * g.c * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
  ParallelFor(pool, chunks, [&](int64_t t) {
    float* tap_partial = partial.data() + t * per_chunk;
    thread_local std::vector<float> mapped;  // the input map's output for one row
    if (in) mapped.resize(g.w * g.c);
    for (int64_t row = rows * t / chunks; row < rows * (t + 1) / chunks; ++row) {
      const int64_t n = row / g.h, r = row % g.h;
      const float* xrow = x + row * g.w * g.c;
      InputGradRow(g, taps, dy, dx, n, r, stream && !in);
      if (in) {
        MaskRow(g, xrow, *in, dx + row * g.w * g.c, tap_partial + tap_elems, mapped.data(), stream);
        TapGradInputRow(g, mapped.data(), dy, tap_partial, n, r);
      } else {
        TapGradInputRow(g, xrow, dy, tap_partial, n, r);
      }
    }
    if (stream) StreamFence();
  });
  const std::vector<double> total = SumInOrder(partial, chunks, per_chunk);
  for (int64_t e = 0; e < tap_elems; ++e) dtaps[e] = static_cast<float>(total[e]);
  if (in) {
    for (int64_t e = 0; e < 2 * g.c; ++e) sums[e] = static_cast<float>(total[tap_elems + e]);
  }
}

ffi::Error DepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> taps, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dtaps,
                             int64_t stride, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto err = CheckGeometry(x, taps, dy.dimensions(), stride, pad_top, pad_left, &g);
      err.failure()) {
    return err;
  }
  RunBackward(pool, g, x.typed_data(), taps.typed_data(), dy.typed_data(), dx->typed_data(),
              dtaps->typed_data(), nullptr, nullptr);
  return ffi::Error::Success();
}

// Training with the previous BatchNorm and activation folded in (y = depthwise(in(x)), in from
// the batch statistics): (dz, dtaps, sums) as in RunBackward.
ffi::Error DepthwiseBackwardFused(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> taps, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_bias,
                                  ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dtaps,
                                  ffi::ResultBuffer<ffi::F32> sums, int64_t stride,
                                  int64_t pad_top, int64_t pad_left, float in_lo, float in_hi) {
  Geometry g;
  if (auto err = CheckGeometry(x, taps, dy.dimensions(), stride, pad_top, pad_left, &g);
      err.failure()) {
    return err;
  }
  const size_t c = static_cast<size_t>(g.c);
  if (in_scale.element_count() != c || in_bias.element_count() != c || sums->element_count() != 2 * c) {
    return ffi::Error::InvalidArgument("depthwise: scale and bias must have C elements, sums 2 C");
  }
  const Affine in{in_scale.typed_data(), in_bias.typed_data(), in_lo, in_hi};
  RunBackward(pool, g, x.typed_data(), taps.typed_data(), dy.typed_data(), dz->typed_data(),
              dtaps->typed_data(), &in, sums->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldDepthwiseForward, DepthwiseForward, manifold::StridedConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldDepthwiseForwardFused, DepthwiseForwardFused,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("fuse_input")
                                  .Attr<float>("in_lo")
                                  .Attr<float>("in_hi")
                                  .Attr<float>("out_lo")
                                  .Attr<float>("out_hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldDepthwiseBackward, DepthwiseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldDepthwiseBackwardFused, DepthwiseBackwardFused,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<float>("in_lo")
                                  .Attr<float>("in_hi"));
