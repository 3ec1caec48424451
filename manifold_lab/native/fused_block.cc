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
// Matrix products: register-blocked AVX-512 tiles (up to 8 x 48, 12 x 32 or 16 x 16 outputs in
// 24 zmm accumulators, the A operand broadcast from memory, no packing), with masked loads and
// stores for widths that are not a multiple of 16, and ymm vectors for a last 8 columns.

#if !defined(__AVX512F__)
#error "the fused block kernel needs AVX-512 (-march=native on a CPU with avx512f)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using manifold::ParallelFor;

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

enum class Epi { kStore, kAdd, kScaleBiasClamp };

inline __mmask16 TailMask(int64_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
}

// The last vector of a tile row, masked by `last` (columns past N): 16 lanes (zmm), or 8 (ymm)
// where at most 8 columns are left, which Zen 4 multiplies at twice the rate of a zmm (so that
// 24 columns cost 1.5 zmm, not 2).
struct Lanes16 {
  using V = __m512;
  static V Zero() { return _mm512_setzero_ps(); }
  static V Narrow(__m512 v) { return v; }
  static V Load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void Store(float* p, __mmask16 m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Clamp(V v, V lo, V hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }
};

struct Lanes8 {
  using V = __m256;
  static V Zero() { return _mm256_setzero_ps(); }
  static V Narrow(__m512 v) { return _mm512_castps512_ps256(v); }
  static V Load(__mmask16 m, const float* p) { return _mm256_maskz_loadu_ps(static_cast<__mmask8>(m), p); }
  static void Store(float* p, __mmask16 m, V v) { _mm256_mask_storeu_ps(p, static_cast<__mmask8>(m), v); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Clamp(V v, V lo, V hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }
};

// Epilogue of one output vector: =, += or scale, bias and clamp.
template <typename L, Epi E>
inline void Put(float* out, __mmask16 m, typename L::V r, const float* scale, const float* bias, typename L::V lo,
                typename L::V hi) {
  if constexpr (E == Epi::kAdd) r = L::Add(r, L::Load(m, out));
  if constexpr (E == Epi::kScaleBiasClamp) r = L::Clamp(L::Fma(r, L::Load(m, scale), L::Load(m, bias)), lo, hi);
  L::Store(out, m, r);
}

// C[MR x (NV-1)*16 + last] (E) A[MR x K] @ B[K x same]: NV - 1 full zmm vectors and one Last.
template <int MR, int NV, typename Last, Epi E>
inline void Tile(int64_t k_len, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc, __mmask16 last, const float* scale, const float* bias, __m512 lo, __m512 hi) {
  constexpr int kFull = NV - 1;
  __m512 acc[MR][kFull > 0 ? kFull : 1];
  typename Last::V tail[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < kFull; ++v) acc[i][v] = _mm512_setzero_ps();
    tail[i] = Last::Zero();
  }
  for (int64_t k = 0; k < k_len; ++k) {
    __m512 bv[kFull > 0 ? kFull : 1];
    const float* brow = b + k * ldb;
#pragma GCC unroll 16
    for (int v = 0; v < kFull; ++v) bv[v] = _mm512_loadu_ps(brow + 16 * v);
    const typename Last::V bt = Last::Load(last, brow + 16 * kFull);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
#pragma GCC unroll 16
      for (int v = 0; v < kFull; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
      tail[i] = Last::Fma(Last::Narrow(av), bt, tail[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < kFull; ++v) {
      Put<Lanes16, E>(c + i * ldc + 16 * v, 0xFFFF, acc[i][v], scale + 16 * v, bias + 16 * v, lo, hi);
    }
    Put<Last, E>(c + i * ldc + 16 * kFull, last, tail[i], scale + 16 * kFull, bias + 16 * kFull,
                 Last::Narrow(lo), Last::Narrow(hi));
  }
}

// The last rows (fewer than MR) of a column block, by the tile of exactly that height.
template <int R, int NV, typename Last, Epi E>
inline void TailRows(int64_t rows, int64_t k_len, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc, __mmask16 last, const float* scale, const float* bias, __m512 lo,
                     __m512 hi) {
  if constexpr (R > 0) {
    if (rows == R) return Tile<R, NV, Last, E>(k_len, a, lda, b, ldb, c, ldc, last, scale, bias, lo, hi);
    TailRows<R - 1, NV, Last, E>(rows, k_len, a, lda, b, ldb, c, ldc, last, scale, bias, lo, hi);
  }
}

// All M rows of one block of NV vectors of columns (the last a Last, masked by `last`).
template <int NV, typename Last, Epi E>
void ColumnBlock(int64_t m, int64_t k_len, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc, __mmask16 last, const float* scale, const float* bias, __m512 lo,
                 __m512 hi) {
  constexpr int kRows = NV == 3 ? 8 : (NV == 2 ? 12 : 16);  // 24 or 16 accumulators
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    Tile<kRows, NV, Last, E>(k_len, a + i * lda, lda, b, ldb, c + i * ldc, ldc, last, scale, bias, lo, hi);
  }
  TailRows<kRows - 1, NV, Last, E>(m - i, k_len, a + i * lda, lda, b, ldb, c + i * ldc, ldc, last, scale, bias,
                                   lo, hi);
}

template <typename Last, Epi E>
void ColumnBlockOf(int nv, int64_t m, int64_t k_len, const float* a, int64_t lda, const float* b, int64_t ldb,
                   float* c, int64_t ldc, __mmask16 last, const float* scale, const float* bias, __m512 lo,
                   __m512 hi) {
  if (nv == 3) ColumnBlock<3, Last, E>(m, k_len, a, lda, b, ldb, c, ldc, last, scale, bias, lo, hi);
  else if (nv == 2) ColumnBlock<2, Last, E>(m, k_len, a, lda, b, ldb, c, ldc, last, scale, bias, lo, hi);
  else ColumnBlock<1, Last, E>(m, k_len, a, lda, b, ldb, c, ldc, last, scale, bias, lo, hi);
}

// C[M x N] (E) A[M x K] @ B[K x N], row-major with leading dimensions; scale, bias and the clamp
// [lo, hi] for Epi::kScaleBiasClamp. Column blocks of up to 48; a last block ending in at most 8
// columns takes them as a ymm vector.
template <Epi E>
void Gemm(int64_t m, int64_t n, int64_t k_len, const float* a, int64_t lda, const float* b, int64_t ldb,
          float* c, int64_t ldc, const float* scale = nullptr, const float* bias = nullptr, float lo = 0.0f,
          float hi = 0.0f) {
  const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
  for (int64_t j = 0; j < n;) {
    const int64_t rem = n - j;
    const int nv = static_cast<int>(std::min<int64_t>(3, (rem + 15) / 16));
    const int64_t last_lanes = std::min<int64_t>(16, rem - 16 * (nv - 1));
    const __mmask16 last = TailMask(last_lanes);
    const float* sj = scale ? scale + j : nullptr;
    const float* bj = bias ? bias + j : nullptr;
    if (last_lanes <= 8) {
      ColumnBlockOf<Lanes8, E>(nv, m, k_len, a, lda, b + j, ldb, c + j, ldc, last, sj, bj, lov, hiv);
    } else {
      ColumnBlockOf<Lanes16, E>(nv, m, k_len, a, lda, b + j, ldb, c + j, ldc, last, sj, bj, lov, hiv);
    }
    j += 16 * nv;
  }
}

// Per-thread buffers: the ring of three expanded rows (padded columns zero; tags: which image row
// each slot holds), a zero row for rows outside the image, and the depthwise output rows of one
// projection product.
struct Scratch {
  std::vector<float> ring, zero, d;
  int64_t tags[3];
};

// Expanded input row r of image n, channels [c0, c0 + ec), into `dst` (padded_w x ec, the
// image's columns from pad_left, the rest zero).
void ExpandRow(const Block& b, const Plan& p, int64_t n, int64_t r, int64_t c0, int64_t ec, float* dst) {
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
void RowsFor(const Block& b, const Plan& p, Scratch& s, int64_t n, int64_t oh, int64_t c0, int64_t ec,
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

// One output row of the depthwise layer on channels [c0, c0 + ec): d = clamp_d(sum of the nine
// taps * s_d + b_d) (+ the expanded pixel itself under the inner shortcut), into d (ow x ec).
void DepthwiseRow(const Block& b, const float* rows[3], int64_t c0, int64_t ec, float* d) {
  const __m512 lo = _mm512_set1_ps(b.d_lo), hi = _mm512_set1_ps(b.d_hi);
  const int64_t step = b.stride * ec;
  for (int64_t c = 0; c < ec; c += 16) {
    __m512 w[9];
    for (int t = 0; t < 9; ++t) w[t] = _mm512_loadu_ps(b.taps + t * b.e + c0 + c);
    const __m512 scale = _mm512_loadu_ps(b.sd + c0 + c), bias = _mm512_loadu_ps(b.bd + c0 + c);
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
      if (b.residual == 2) {
        acc = _mm512_add_ps(acc, _mm512_loadu_ps(rows[b.pad_top] + (o + b.pad_left) * ec + c));
      }
      _mm512_storeu_ps(d + o * ec + c, acc);
    }
  }
}

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
  for (int64_t c0 = e0; c0 < e1; c0 += p.ec) {
    const int64_t ec = std::min(p.ec, e1 - c0);
    std::fill(s.tags, s.tags + 3, -1);
    for (int64_t g = g0; g < g1; g += p.batch_rows) {
      const int64_t count = std::min(p.batch_rows, g1 - g), m = count * b.ow;
      for (int64_t q = 0; q < count; ++q) {
        const float* rows[3];
        RowsFor(b, p, s, (g + q) / b.oh, (g + q) % b.oh, c0, ec, rows);
        DepthwiseRow(b, rows, c0, ec, s.d.data() + q * b.ow * ec);
      }
      float* out = acc + (g - g0) * b.ow * b.cout;  // the rows' accumulators are contiguous
      const float* w = b.wp + c0 * b.cout;
      if (c0 == e0) Gemm<Epi::kStore>(m, b.cout, ec, s.d.data(), ec, w, b.cout, out, b.cout);
      else Gemm<Epi::kAdd>(m, b.cout, ec, s.d.data(), ec, w, b.cout, out, b.cout);
    }
  }
}

constexpr int64_t kSliceBytes = 384 << 10;  // weights of a slice, and its ring of rows
constexpr int64_t kTaskBytes = 256 << 10;   // a task's projection accumulator
constexpr int64_t kMinPixels = 48;          // rows of the projection's products, at least

// Slices: the widest multiple of 16 whose weights and row ring fit kSliceBytes. Tasks: strips of
// an image as tall as kTaskBytes allows, or whole images, as many as fit kTaskBytes while every
// thread gets two tasks. Groups: where there are fewer tasks than threads, the expanded channels
// are shared out between tasks instead of cutting the image into thin strips (whose halo rows
// would be expanded twice).
Plan MakePlan(const Block& b, int64_t threads) {
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
  if (p.tasks < threads) p.groups = std::min<int64_t>(b.e / 16, (threads + p.tasks - 1) / p.tasks);
  return p;
}

// The output rows [g0, g1) of task t: a strip of one image, or whole images.
void TaskRows(const Block& b, const Plan& p, int64_t t, int64_t* g0, int64_t* g1) {
  if (p.strips > 1) {
    const int64_t n = t / p.strips, strip = t % p.strips;
    *g0 = n * b.oh + strip * p.rows_per_strip;
    *g1 = std::min(n * b.oh + b.oh, *g0 + p.rows_per_strip);
    return;
  }
  *g0 = t * p.images * b.oh;
  *g1 = std::min(b.n, (t + 1) * p.images) * b.oh;
}

void Run(ffi::ThreadPool& pool, const Block& b) {
  const Plan p = MakePlan(b, std::max<int64_t>(1, pool.num_threads()));
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
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
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
                                  .Attr<int64_t>("expand_mode")
                                  .Attr<int64_t>("residual")
                                  .Attr<float>("e_lo")
                                  .Attr<float>("e_hi")
                                  .Attr<float>("d_lo")
                                  .Attr<float>("d_hi")
                                  .Attr<float>("p_lo")
                                  .Attr<float>("p_hi"));
