// The strip machinery the fused block kernels share (fused_block.cc: inference,
// fused_block_train.cc: training): a block's shapes and operands, how its output rows are cut
// into tasks and its expanded channels into cache-sized slices, and the expansion and depthwise
// rows computed from a ring of three expanded rows (see fused_block.cc for the arithmetic).

#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "gemm_tiles.h"

namespace manifold::strips {

using tiles::Epi;
using tiles::Gemm;
using tiles::TailMask;

// A block's shapes, operands (expansion weights, the three per-channel BatchNorm maps, taps,
// projection weights) and clamps. The expanded width e is a multiple of 16.
struct Block {
  int64_t n, h, w, cin, e, cout, oh, ow, stride, pad_top, pad_left;
  int64_t expand_mode, residual;
  const float *x, *we, *se, *be, *taps, *sd, *bd, *wp, *sp, *bp;
  float e_lo, e_hi, d_lo, d_hi, p_lo, p_hi;
  float* y;
};

// How the work is cut: tasks of output rows (strips of an image, or several whole images),
// groups of expanded channels (each task of a group writes a partial projection, summed after),
// slices of ec channels per pass.
struct Plan {
  int64_t rows_per_strip, strips, images, tasks, groups, ec, padded_w;
  int64_t batch_rows;  // depthwise output rows per projection product (at least kMinPixels rows)
};

// The per-channel map a depthwise row applies to its sums: clamp(sum * scale + bias), plus the
// expanded pixel itself under the inner shortcut.
struct DwMap {
  const float *scale, *bias;
  float lo, hi;
  bool inner;
};

// Per-thread buffers: the ring of three expanded rows (padded columns zero; tags: which image row
// each slot holds), a zero row for rows outside the image, and the depthwise output rows of one
// projection product.
struct Scratch {
  std::vector<float> ring, zero, d;
  int64_t tags[3];
};

// Expanded input row r of image n, channels [c0, c0 + ec), into `dst` (padded_w x ec, the
// image's columns from pad_left, the rest zero).
inline void ExpandRow(const Block& b, const Plan& p, int64_t n, int64_t r, int64_t c0, int64_t ec, float* dst) {
  std::fill(dst, dst + b.pad_left * ec, 0.0f);
  std::fill(dst + (b.pad_left + b.w) * ec, dst + p.padded_w * ec, 0.0f);
  const float* xrow = b.x + (n * b.h + r) * b.w * b.cin;
  float* out = dst + b.pad_left * ec;
  if (b.expand_mode == 0) {
    Gemm<Epi::kScaleBiasClamp>(b.w, ec, b.cin, xrow, b.cin, b.we + c0, b.e, out, ec, b.se + c0, b.be + c0, b.e_lo,
                               b.e_hi);
    return;
  }
  const __m512 lo = _mm512_set1_ps(b.e_lo), hi = _mm512_set1_ps(b.e_hi);
  for (int64_t col = 0; col < b.w; ++col) {
    for (int64_t c = 0; c < ec; c += 16) {  // channels at or past cin are padding: zero
      const __mmask16 m = TailMask(std::max<int64_t>(0, b.cin - (c0 + c)));
      const __m512 v = _mm512_maskz_loadu_ps(m, xrow + col * b.cin + c0 + c);
      __m512 z = _mm512_fmadd_ps(v, _mm512_loadu_ps(b.se + c0 + c), _mm512_loadu_ps(b.be + c0 + c));
      z = _mm512_maskz_mov_ps(m, _mm512_min_ps(_mm512_max_ps(z, lo), hi));
      _mm512_storeu_ps(out + col * ec + c, z);
    }
  }
}

// The three expanded rows output row oh reads (the zero row outside the image), computed once
// per pass through the ring.
inline void RowsFor(const Block& b, const Plan& p, Scratch& s, int64_t n, int64_t oh, int64_t c0, int64_t ec,
                    const float* rows[3]) {
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t r = oh * b.stride + i - b.pad_top;
    if (r < 0 || r >= b.h) {
      rows[i] = s.zero.data();
      continue;
    }
    const int64_t slot = r % 3, id = n * b.h + r;
    float* dst = s.ring.data() + slot * p.padded_w * ec;
    if (s.tags[slot] != id) {
      ExpandRow(b, p, n, r, c0, ec, dst);
      s.tags[slot] = id;
    }
    rows[i] = dst;
  }
}

// One output row of the depthwise layer on channels [c0, c0 + ec) from its three expanded rows:
// clamp(sum of the nine taps * scale + bias) (+ the expanded pixel itself under the inner
// shortcut), into d (ow x ec).
inline void DepthwiseRow(const Block& b, const float* rows[3], int64_t c0, int64_t ec, const DwMap& map,
                         float* d) {
  const __m512 lo = _mm512_set1_ps(map.lo), hi = _mm512_set1_ps(map.hi);
  const int64_t step = b.stride * ec;
  for (int64_t c = 0; c < ec; c += 16) {
    __m512 w[9];
    for (int t = 0; t < 9; ++t) w[t] = _mm512_loadu_ps(b.taps + t * b.e + c0 + c);
    const __m512 scale = _mm512_loadu_ps(map.scale + c0 + c), bias = _mm512_loadu_ps(map.bias + c0 + c);
    const float* r0 = rows[0] + c;
    const float* r1 = rows[1] + c;
    const float* r2 = rows[2] + c;
    for (int64_t o = 0; o < b.ow; ++o) {
      const int64_t base = o * step;
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < 3; ++j) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + base + j * ec), w[j], acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + base + j * ec), w[3 + j], acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + base + j * ec), w[6 + j], acc);
      }
      acc = _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(acc, scale, bias), lo), hi);
      if (map.inner) acc = _mm512_add_ps(acc, _mm512_loadu_ps(rows[b.pad_top] + (o + b.pad_left) * ec + c));
      _mm512_storeu_ps(d + o * ec + c, acc);
    }
  }
}

constexpr int64_t kSliceBytes = 384 << 10;  // weights of a slice, and its ring of rows
constexpr int64_t kTaskBytes = 256 << 10;   // a task's projection accumulator
constexpr int64_t kMinPixels = 48;          // rows of the projection's products, at least

// Slices: the widest multiple of 16 whose weights and row ring fit kSliceBytes. Tasks: strips of
// an image as tall as kTaskBytes allows, or whole images, as many as fit kTaskBytes while every
// thread gets two tasks. Groups (only with `split_channels`): where there are fewer tasks than
// threads, the expanded channels are shared out between tasks instead of cutting the image into
// thin strips (whose halo rows would be expanded twice).
inline Plan MakePlan(const Block& b, int64_t threads, bool split_channels) {
  Plan p;
  p.padded_w = std::max(b.pad_left + b.w, (b.ow - 1) * b.stride + 3);
  const int64_t per_channel = 4 * (b.cin + b.cout + 10) + 4 * 4 * p.padded_w;
  p.ec = std::clamp<int64_t>(kSliceBytes / per_channel / 16 * 16, 16, b.e);
  const int64_t row_bytes = std::max<int64_t>(1, b.ow * b.cout * 4);
  p.rows_per_strip = std::clamp<int64_t>(kTaskBytes / row_bytes, 1, b.oh);
  p.strips = (b.oh + p.rows_per_strip - 1) / p.rows_per_strip;
  p.rows_per_strip = (b.oh + p.strips - 1) / p.strips;  // even strips
  p.images = 1;
  if (p.strips == 1) {
    const int64_t fit = std::max<int64_t>(1, kTaskBytes / (b.oh * row_bytes));
    p.images = std::clamp<int64_t>(b.n / (2 * threads), 1, fit);
  }
  p.tasks = p.strips * ((b.n + p.images - 1) / p.images);
  p.batch_rows = (kMinPixels + b.ow - 1) / b.ow;
  p.groups = 1;
  if (split_channels && p.tasks < threads) p.groups = std::min<int64_t>(b.e / 16, (threads + p.tasks - 1) / p.tasks);
  return p;
}

// The output rows [g0, g1) of task t (row g: image g / oh, row g % oh): a strip of one image, or
// whole images.
inline void TaskRows(const Block& b, const Plan& p, int64_t t, int64_t* g0, int64_t* g1) {
  if (p.strips > 1) {
    const int64_t n = t / p.strips, strip = t % p.strips;
    *g0 = n * b.oh + strip * p.rows_per_strip;
    *g1 = std::min(n * b.oh + b.oh, *g0 + p.rows_per_strip);
    return;
  }
  *g0 = t * p.images * b.oh;
  *g1 = std::min(b.n, (t + 1) * p.images) * b.oh;
}

constexpr float kInf = std::numeric_limits<float>::infinity();

}  // namespace manifold::strips
