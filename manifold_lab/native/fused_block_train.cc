// Training of a MobileNetV2 inverted-residual block without writing its expanded tensors: three
// XLA FFI calls around the inference kernel (fused_block.cc), float32 NHWC, XLA:CPU.
//
// Training BatchNorm needs each layer's batch statistics before its activation can be applied,
// and its backward pass needs two channel sums over the whole batch before the gradient can go
// further back. So the block is computed in passes over the same strips of rows, each of which
// recomputes the expanded tiles (z = x @ w_expand, e = clamp_e(z * s_e + b_e), the depthwise sums
// r and d = clamp_d(r * s_d + b_d) (+ e, the inner shortcut)) in the core's cache:
//   stats      the mean and variance of r (the expansion's statistics need no pass: the caller
//              has them from the block input's mean and covariance, z being linear in x);
//   forward    the inference kernel with the batch maps, an identity projection map and no
//              clamp: the raw projection p = d @ w_project, whose BatchNorm runs outside;
//   bwd_sums   from g_p (the gradient of p): the projection's weight gradient d^T g_p and the
//              depthwise BatchNorm's sums of u and u * r, u = g_d where clamp_d is open,
//              g_d = g_p @ w_project^T;
//   bwd        with g_r = alpha * u + beta * r + gamma (the depthwise BatchNorm's backward pass,
//              its coefficients from bwd_sums): the tap gradient, g_e = depthwise^T(g_r) (+ g_d),
//              v = g_e where clamp_e is open, the expansion BatchNorm's sums of v and v * z, and
//              the two products that are linear in v: G = (s_e * v) @ w_expand^T (the block
//              input's gradient but for the BatchNorm terms, which the caller adds) and
//              x^T (s_e * v) (the expansion weight gradient but for the same terms).
// A strip's depthwise transpose reaches input rows that the next strip owns (its halo): their
// partial G goes to a spill buffer that is added after all strips, in strip order. Every
// reduction over pixels is summed per chunk of tasks (a fixed range of tasks) and the chunks in
// order, so that results do not depend on which thread ran what. Channel sums are float64.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "block_strips.h"
#include "common.h"

namespace {

using manifold::ParallelFor;
using namespace manifold::strips;

// Operands of the backward calls beside the block's own.
struct Grads {
  const float *we_t, *wp_t, *gp, *coef;  // w_expand^T [E, Cin], w_project^T [C, E], g_p, [3, E]
};

// Per-thread buffers of the training passes.
struct TrainScratch {
  Scratch rows;                                 // the ring of expanded rows (stats, bwd_sums)
  std::vector<float> r, d, gd, dt, ones, zeros;  // depthwise rows, g_d rows, a transpose
  std::vector<float> z, e, ge, xt;              // a strip's z, e, g_e rows and x^T (bwd)
};

// The strips a task's expanded-side buffers must hold stay within kStripBytes (three buffers).
constexpr int64_t kStripBytes = 1 << 20;

Plan TrainPlan(const Block& b, int64_t threads) {
  Plan p = MakePlan(b, threads, false);
  const int64_t row_bytes = 3 * 4 * p.padded_w * p.ec * b.stride;
  const int64_t rows = std::clamp<int64_t>(kStripBytes / std::max<int64_t>(1, row_bytes), 2, b.oh);
  if (rows < p.rows_per_strip || (p.strips == 1 && p.images == 1 && rows < b.oh)) {
    p.strips = (b.oh + rows - 1) / rows;
    p.rows_per_strip = (b.oh + p.strips - 1) / p.strips;
    p.images = 1;
    p.tasks = p.strips * b.n;
  }
  return p;
}

// Tasks in chunks of consecutive tasks, each with its own partial sums (`width` floats and
// 2 * E doubles), run in parallel and added in chunk order.
struct Chunks {
  int64_t count, width;
  std::vector<float> partial;
  std::vector<double> sums;
  Chunks(int64_t tasks, int64_t threads, int64_t width, int64_t e)
      : count(std::max<int64_t>(1, std::min<int64_t>(tasks, 4 * threads))), width(width),
        partial(count * width, 0.0f), sums(count * 2 * e, 0.0) {}
  template <typename Body>
  void Run(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
    ParallelFor(pool, count, [&](int64_t k) {
      for (int64_t t = tasks * k / count; t < tasks * (k + 1) / count; ++t) body(t, k);
    });
  }
  // The partials' total into out[width], the channel sums' into sums_out[2 * E].
  void Total(int64_t e, float* out, float* sums_out) const {
    const std::vector<double> total = manifold::SumInOrder(partial, count, width);
    std::copy(total.begin(), total.end(), out);
    const std::vector<double> channel = manifold::SumInOrder(sums, count, 2 * e);
    std::copy(channel.begin(), channel.end(), sums_out);
  }
};

void ResizeScratch(TrainScratch& s, const Block& b, const Plan& p) {
  s.rows.ring.resize(3 * p.padded_w * p.ec);
  s.rows.zero.assign(p.padded_w * p.ec, 0.0f);
  const int64_t batch = p.batch_rows * b.ow * p.ec;
  s.r.resize(batch);
  s.d.resize(batch);
  s.gd.resize(batch);
  s.dt.resize(batch);
  s.ones.assign(b.e, 1.0f);
  s.zeros.assign(b.e, 0.0f);
}

// The raw depthwise sums (no map) of output row oh of image n into r, its expanded rows in `rows`.
void RawRow(const Block& b, const Plan& p, TrainScratch& s, int64_t n, int64_t oh, int64_t c0, int64_t ec,
            const float* rows[3], float* r) {
  RowsFor(b, p, s.rows, n, oh, c0, ec, rows);
  DepthwiseRow(b, rows, c0, ec, DwMap{s.ones.data(), s.zeros.data(), -kInf, kInf, false}, r);
}

// sums[c] += sum over `pixels` rows of a[.., c] * (b ? b[.., c] : 1) (lanes of 16 channels, ec of them).
void AddChannelSums(const float* a, const float* b, int64_t pixels, int64_t ec, double* sums) {
  for (int64_t c = 0; c < ec; c += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t q = 0; q < pixels; ++q) {
      const __m512 v = _mm512_loadu_ps(a + q * ec + c);
      acc = b ? _mm512_fmadd_ps(v, _mm512_loadu_ps(b + q * ec + c), acc) : _mm512_add_ps(acc, v);
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc);
    for (int i = 0; i < 16; ++i) sums[c + i] += lanes[i];
  }
}

// dst[cols x rows] = src[rows x cols]^T (src rows `ld` apart).
void Transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * ld + j];
  }
}

// ---------------------------------------------------------------------------------------- stats

void StatsTask(const Block& b, const Plan& p, int64_t g0, int64_t g1, double* sums) {
  thread_local TrainScratch s;
  ResizeScratch(s, b, p);
  for (int64_t c0 = 0; c0 < b.e; c0 += p.ec) {
    const int64_t ec = std::min(p.ec, b.e - c0);
    std::fill(s.rows.tags, s.rows.tags + 3, -1);
    for (int64_t g = g0; g < g1; ++g) {
      const float* rows[3];
      RawRow(b, p, s, g / b.oh, g % b.oh, c0, ec, rows, s.r.data());
      AddChannelSums(s.r.data(), nullptr, b.ow, ec, sums + c0);
      AddChannelSums(s.r.data(), s.r.data(), b.ow, ec, sums + b.e + c0);
    }
  }
}

// ------------------------------------------------------------------------------------- bwd_sums

// d = clamp_d(r * s_d + b_d) (+ e) and u = g_d where clamp_d is open, for one output row (ow
// pixels from `at` in the batch buffers) whose expanded rows are `rows`.
void MaskRow(const Block& b, TrainScratch& s, const float* rows[3], int64_t at, int64_t c0, int64_t ec) {
  const __m512 lo = _mm512_set1_ps(b.d_lo), hi = _mm512_set1_ps(b.d_hi);
  for (int64_t c = 0; c < ec; c += 16) {
    const __m512 scale = _mm512_loadu_ps(b.sd + c0 + c), bias = _mm512_loadu_ps(b.bd + c0 + c);
    for (int64_t o = 0; o < b.ow; ++o) {
      const int64_t i = (at + o) * ec + c;
      const __m512 pre = _mm512_fmadd_ps(_mm512_loadu_ps(s.r.data() + i), scale, bias);
      __m512 d = _mm512_min_ps(_mm512_max_ps(pre, lo), hi);
      if (b.residual == 2) d = _mm512_add_ps(d, _mm512_loadu_ps(rows[b.pad_top] + (o + b.pad_left) * ec + c));
      _mm512_storeu_ps(s.d.data() + i, d);
      const __mmask16 open = _mm512_cmp_ps_mask(pre, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(pre, hi, _CMP_LT_OQ);
      _mm512_storeu_ps(s.gd.data() + i, _mm512_maskz_mov_ps(open, _mm512_loadu_ps(s.gd.data() + i)));
    }
  }
}

void BwdSumsTask(const Block& b, const Plan& p, const Grads& gr, int64_t g0, int64_t g1, float* dwp,
                 double* sums) {
  thread_local TrainScratch s;
  ResizeScratch(s, b, p);
  for (int64_t c0 = 0; c0 < b.e; c0 += p.ec) {
    const int64_t ec = std::min(p.ec, b.e - c0);
    std::fill(s.rows.tags, s.rows.tags + 3, -1);
    for (int64_t g = g0; g < g1; g += p.batch_rows) {
      const int64_t count = std::min(p.batch_rows, g1 - g), m = count * b.ow;
      const float* gp = gr.gp + g * b.ow * b.cout;
      Gemm<Epi::kStore>(m, ec, b.cout, gp, b.cout, gr.wp_t + c0, b.e, s.gd.data(), ec);  // g_d
      for (int64_t q = 0; q < count; ++q) {
        const float* rows[3];
        RawRow(b, p, s, (g + q) / b.oh, (g + q) % b.oh, c0, ec, rows, s.r.data() + q * b.ow * ec);
        MaskRow(b, s, rows, q * b.ow, c0, ec);  // s.gd now holds u
      }
      AddChannelSums(s.gd.data(), nullptr, m, ec, sums + c0);
      AddChannelSums(s.gd.data(), s.r.data(), m, ec, sums + b.e + c0);
      Transpose(s.d.data(), m, ec, ec, s.dt.data());
      Gemm<Epi::kAdd>(ec, b.cout, m, s.dt.data(), m, gp, b.cout, dwp + c0 * b.cout, b.cout);
    }
  }
}

// ------------------------------------------------------------------------------------------ bwd

// Input rows of one strip (output rows [o0, o1) of an image): the expanded rows it reads from
// rin0 (possibly above the image), those inside the image [lo, touched), and the rows it owns
// [lo, owned) (to the image's end for its last strip); [owned, touched) is its spill.
struct StripRows {
  int64_t rin0, count, lo, touched, owned;
  StripRows(const Block& b, int64_t o0, int64_t o1, bool last)
      : rin0(o0 * b.stride - b.pad_top), count((o1 - o0 - 1) * b.stride + 3), lo(std::max<int64_t>(0, rin0)),
        touched(std::min(b.h, rin0 + count)),
        owned(last ? b.h : std::clamp(o1 * b.stride - b.pad_top, lo, b.h)) {}
};
constexpr int64_t kSpillRows = 3;

// z and e = clamp_e(z * s_e + b_e) of the strip's rows on channels [c0, c0 + ec) (e zero outside
// the image and in the padded columns).
void ExpandStrip(const Block& b, const Plan& p, TrainScratch& s, int64_t n, const StripRows& sr, int64_t c0,
                 int64_t ec) {
  std::fill(s.e.begin(), s.e.end(), 0.0f);
  const __m512 lo = _mm512_set1_ps(b.e_lo), hi = _mm512_set1_ps(b.e_hi);
  for (int64_t j = 0; j < sr.count; ++j) {
    const int64_t r = sr.rin0 + j;
    if (r < 0 || r >= b.h) continue;
    float* z = s.z.data() + j * b.w * ec;
    Gemm<Epi::kStore>(b.w, ec, b.cin, b.x + (n * b.h + r) * b.w * b.cin, b.cin, b.we + c0, b.e, z, ec);
    float* e = s.e.data() + (j * p.padded_w + b.pad_left) * ec;
    for (int64_t c = 0; c < ec; c += 16) {
      const __m512 scale = _mm512_loadu_ps(b.se + c0 + c), bias = _mm512_loadu_ps(b.be + c0 + c);
      for (int64_t col = 0; col < b.w; ++col) {
        const __m512 pre = _mm512_fmadd_ps(_mm512_loadu_ps(z + col * ec + c), scale, bias);
        _mm512_storeu_ps(e + col * ec + c, _mm512_min_ps(_mm512_max_ps(pre, lo), hi));
      }
    }
  }
}

// g_r = alpha * u + beta * r + gamma (u = g_d where clamp_d is open) into s.dt, for m pixels.
void DepthwiseGrad(const Block& b, const Grads& gr, TrainScratch& s, int64_t m, int64_t c0, int64_t ec) {
  const __m512 lo = _mm512_set1_ps(b.d_lo), hi = _mm512_set1_ps(b.d_hi);
  for (int64_t c = 0; c < ec; c += 16) {
    const __m512 scale = _mm512_loadu_ps(b.sd + c0 + c), bias = _mm512_loadu_ps(b.bd + c0 + c);
    const __m512 alpha = _mm512_loadu_ps(gr.coef + c0 + c), beta = _mm512_loadu_ps(gr.coef + b.e + c0 + c);
    const __m512 gamma = _mm512_loadu_ps(gr.coef + 2 * b.e + c0 + c);
    for (int64_t q = 0; q < m; ++q) {
      const __m512 r = _mm512_loadu_ps(s.r.data() + q * ec + c);
      const __m512 pre = _mm512_fmadd_ps(r, scale, bias);
      const __mmask16 open = _mm512_cmp_ps_mask(pre, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(pre, hi, _CMP_LT_OQ);
      const __m512 u = _mm512_maskz_mov_ps(open, _mm512_loadu_ps(s.gd.data() + q * ec + c));
      _mm512_storeu_ps(s.dt.data() + q * ec + c, _mm512_fmadd_ps(alpha, u, _mm512_fmadd_ps(beta, r, gamma)));
    }
  }
}

// For output row `orow` (batch row q): the tap gradients (+= e * g_r) and g_e (+= tap * g_r,
// + g_d at the same pixel under the inner shortcut), g_r in s.dt.
void ScatterRow(const Block& b, const Plan& p, TrainScratch& s, const StripRows& sr, int64_t orow, int64_t q,
                int64_t c0, int64_t ec, float* dtaps) {
  const int64_t j0 = orow * b.stride - b.pad_top - sr.rin0, row = p.padded_w * ec;
  for (int64_t c = 0; c < ec; c += 16) {
    __m512 w[9], acc[9];
    for (int t = 0; t < 9; ++t) {
      w[t] = _mm512_loadu_ps(b.taps + t * b.e + c0 + c);
      acc[t] = _mm512_setzero_ps();
    }
    for (int64_t oc = 0; oc < b.ow; ++oc) {
      const __m512 g = _mm512_loadu_ps(s.dt.data() + (q * b.ow + oc) * ec + c);
      for (int i = 0; i < 3; ++i) {
        const float* e = s.e.data() + (j0 + i) * row + oc * b.stride * ec + c;
        float* ge = s.ge.data() + (j0 + i) * row + oc * b.stride * ec + c;
        for (int k = 0; k < 3; ++k) {
          acc[3 * i + k] = _mm512_fmadd_ps(_mm512_loadu_ps(e + k * ec), g, acc[3 * i + k]);
          _mm512_storeu_ps(ge + k * ec, _mm512_fmadd_ps(w[3 * i + k], g, _mm512_loadu_ps(ge + k * ec)));
        }
      }
      if (b.residual == 2) {
        float* ge = s.ge.data() + (j0 + b.pad_top) * row + (oc + b.pad_left) * ec + c;
        _mm512_storeu_ps(ge, _mm512_add_ps(_mm512_loadu_ps(ge),
                                           _mm512_loadu_ps(s.gd.data() + (q * b.ow + oc) * ec + c)));
      }
    }
    for (int t = 0; t < 9; ++t) {
      float* dst = dtaps + t * b.e + c0 + c;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[t]));
    }
  }
}

// v = g_e where clamp_e is open on the strip's rows inside the image; the sums of v and v * z;
// then s_e * v in place of z (the operand of both products).
void ExpansionGrad(const Block& b, const Plan& p, TrainScratch& s, const StripRows& sr, int64_t c0, int64_t ec,
                   double* sums) {
  const __m512 lo = _mm512_set1_ps(b.e_lo), hi = _mm512_set1_ps(b.e_hi);
  for (int64_t r = sr.lo; r < sr.touched; ++r) {
    float* z = s.z.data() + (r - sr.rin0) * b.w * ec;
    const float* ge = s.ge.data() + ((r - sr.rin0) * p.padded_w + b.pad_left) * ec;
    for (int64_t c = 0; c < ec; c += 16) {
      const __m512 scale = _mm512_loadu_ps(b.se + c0 + c), bias = _mm512_loadu_ps(b.be + c0 + c);
      __m512 sum_v = _mm512_setzero_ps(), sum_vz = _mm512_setzero_ps();
      for (int64_t col = 0; col < b.w; ++col) {
        const __m512 zv = _mm512_loadu_ps(z + col * ec + c);
        const __m512 pre = _mm512_fmadd_ps(zv, scale, bias);
        const __mmask16 open = _mm512_cmp_ps_mask(pre, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(pre, hi, _CMP_LT_OQ);
        const __m512 v = _mm512_maskz_mov_ps(open, _mm512_loadu_ps(ge + col * ec + c));
        sum_v = _mm512_add_ps(sum_v, v);
        sum_vz = _mm512_fmadd_ps(v, zv, sum_vz);
        _mm512_storeu_ps(z + col * ec + c, _mm512_mul_ps(scale, v));
      }
      alignas(64) float lanes[2][16];
      _mm512_store_ps(lanes[0], sum_v);
      _mm512_store_ps(lanes[1], sum_vz);
      for (int i = 0; i < 16; ++i) {
        sums[c0 + c + i] += lanes[0][i];
        sums[b.e + c0 + c + i] += lanes[1][i];
      }
    }
  }
}

// The backward pass of output rows [o0, o1) of image n (see the file comment): G into its owned
// rows of `g` and its spill rows, the weight, tap and channel sums into the chunk's partials.
void BwdStrip(const Block& b, const Plan& p, const Grads& gr, int64_t n, int64_t o0, int64_t o1, bool last,
              float* g, float* spill, float* dwe, float* dtaps, double* sums) {
  thread_local TrainScratch s;
  ResizeScratch(s, b, p);
  const StripRows sr(b, o0, o1, last);
  const int64_t pixels = (sr.touched - sr.lo) * b.w;
  s.z.resize(sr.count * b.w * p.ec);
  s.xt.resize(b.cin * pixels);
  Transpose(b.x + (n * b.h + sr.lo) * b.w * b.cin, pixels, b.cin, b.cin, s.xt.data());
  std::fill(g + (n * b.h + sr.lo) * b.w * b.cin, g + (n * b.h + sr.owned) * b.w * b.cin, 0.0f);
  std::fill(spill, spill + kSpillRows * b.w * b.cin, 0.0f);
  for (int64_t c0 = 0; c0 < b.e; c0 += p.ec) {
    const int64_t ec = std::min(p.ec, b.e - c0);
    s.e.resize(sr.count * p.padded_w * ec);
    s.ge.assign(s.e.size(), 0.0f);
    ExpandStrip(b, p, s, n, sr, c0, ec);
    for (int64_t o = o0; o < o1; o += p.batch_rows) {
      const int64_t count = std::min(p.batch_rows, o1 - o), m = count * b.ow;
      Gemm<Epi::kStore>(m, ec, b.cout, gr.gp + (n * b.oh + o) * b.ow * b.cout, b.cout, gr.wp_t + c0, b.e,
                        s.gd.data(), ec);
      for (int64_t q = 0; q < count; ++q) {
        const int64_t j0 = (o + q) * b.stride - b.pad_top - sr.rin0;
        const float* rows[3];
        for (int i = 0; i < 3; ++i) rows[i] = s.e.data() + (j0 + i) * p.padded_w * ec;
        DepthwiseRow(b, rows, c0, ec, DwMap{s.ones.data(), s.zeros.data(), -kInf, kInf, false},
                     s.r.data() + q * b.ow * ec);
      }
      DepthwiseGrad(b, gr, s, m, c0, ec);
      for (int64_t q = 0; q < count; ++q) ScatterRow(b, p, s, sr, o + q, q, c0, ec, dtaps);
    }
    ExpansionGrad(b, p, s, sr, c0, ec, sums);
    const float* a = s.z.data() + (sr.lo - sr.rin0) * b.w * ec;  // s_e * v from row lo
    const int64_t own = std::max<int64_t>(0, std::min(sr.owned, sr.touched) - sr.lo);
    Gemm<Epi::kAdd>(own * b.w, b.cin, ec, a, ec, gr.we_t + c0 * b.cin, b.cin, g + (n * b.h + sr.lo) * b.w * b.cin,
                    b.cin);
    if (sr.touched > sr.owned) {
      Gemm<Epi::kAdd>((sr.touched - sr.owned) * b.w, b.cin, ec, a + own * b.w * ec, ec, gr.we_t + c0 * b.cin,
                      b.cin, spill, b.cin);
    }
    Gemm<Epi::kAdd>(b.cin, ec, pixels, s.xt.data(), pixels, a, ec, dwe + c0, b.e);
  }
}

// ------------------------------------------------------------------------------------- the calls

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

void RunStats(ffi::ThreadPool& pool, const Block& b, float* stats) {
  const Plan p = TrainPlan(b, Threads(pool));
  Chunks ch(p.tasks, Threads(pool), 0, b.e);
  ch.Run(pool, p.tasks, [&](int64_t t, int64_t k) {
    int64_t g0, g1;
    TaskRows(b, p, t, &g0, &g1);
    StatsTask(b, p, g0, g1, ch.sums.data() + k * 2 * b.e);
  });
  const std::vector<double> sums = manifold::SumInOrder(ch.sums, ch.count, 2 * b.e);
  const double count = static_cast<double>(b.n * b.oh * b.ow);
  for (int64_t c = 0; c < b.e; ++c) {
    const double mean = sums[c] / count;
    stats[c] = static_cast<float>(mean);
    stats[b.e + c] = static_cast<float>(std::max(0.0, sums[b.e + c] / count - mean * mean));
  }
}

void RunBwdSums(ffi::ThreadPool& pool, const Block& b, const Grads& gr, float* dwp, float* sums) {
  const Plan p = TrainPlan(b, Threads(pool));
  Chunks ch(p.tasks, Threads(pool), b.e * b.cout, b.e);
  ch.Run(pool, p.tasks, [&](int64_t t, int64_t k) {
    int64_t g0, g1;
    TaskRows(b, p, t, &g0, &g1);
    BwdSumsTask(b, p, gr, g0, g1, ch.partial.data() + k * ch.width, ch.sums.data() + k * 2 * b.e);
  });
  ch.Total(b.e, dwp, sums);
}

// dwe_taps: [Cin * E] then [9 * E].
void RunBwd(ffi::ThreadPool& pool, const Block& b, const Grads& gr, float* g, float* dwe_taps, float* sums) {
  const Plan p = TrainPlan(b, Threads(pool));
  Chunks ch(p.tasks, Threads(pool), (b.cin + 9) * b.e, b.e);
  const int64_t spill_size = kSpillRows * b.w * b.cin;
  std::vector<float> spill(p.tasks * spill_size);
  ch.Run(pool, p.tasks, [&](int64_t t, int64_t k) {
    float* dwe = ch.partial.data() + k * ch.width;
    double* sums = ch.sums.data() + k * 2 * b.e;
    if (p.strips > 1) {
      const int64_t o0 = (t % p.strips) * p.rows_per_strip, o1 = std::min(b.oh, o0 + p.rows_per_strip);
      BwdStrip(b, p, gr, t / p.strips, o0, o1, o1 == b.oh, g, spill.data() + t * spill_size, dwe,
               dwe + b.cin * b.e, sums);
      return;
    }
    for (int64_t n = t * p.images; n < std::min(b.n, (t + 1) * p.images); ++n) {
      BwdStrip(b, p, gr, n, 0, b.oh, true, g, spill.data() + t * spill_size, dwe, dwe + b.cin * b.e, sums);
    }
  });
  ch.Total(b.e, dwe_taps, sums);
  if (p.strips == 1) return;
  for (int64_t t = 0; t < p.tasks; ++t) {  // the halo rows' G, in strip order
    const int64_t o0 = (t % p.strips) * p.rows_per_strip, o1 = std::min(b.oh, o0 + p.rows_per_strip);
    const StripRows sr(b, o0, o1, o1 == b.oh);
    float* dst = g + ((t / p.strips) * b.h + sr.owned) * b.w * b.cin;
    const float* src = spill.data() + t * spill_size;
    for (int64_t i = 0; i < std::max<int64_t>(0, sr.touched - sr.owned) * b.w * b.cin; ++i) dst[i] += src[i];
  }
}

using Vector = ffi::Buffer<ffi::F32>;
using Result = ffi::ResultBuffer<ffi::F32>;

// The attributes every training call takes: the geometry and the two clamps.
struct Attrs {
  int64_t stride, pad_top, pad_left, residual;
  float e_lo, e_hi, d_lo, d_hi;
};

// A Block of x [N, H, W, Cin], w_expand [Cin, E], the expansion map, taps [3, 3, E] (and the
// depthwise map; the caller passes it again where a call has none), output rows oh x ow, cout.
Block MakeBlock(const Vector& x, const Vector& we, const Vector& se, const Vector& be, const Vector& taps,
                const Vector& sd, const Vector& bd, int64_t oh, int64_t ow, int64_t cout, const Attrs& a) {
  const auto xd = x.dimensions();
  return Block{xd[0], xd[1], xd[2], xd[3], static_cast<int64_t>(be.element_count()), cout, oh, ow, a.stride,
               a.pad_top, a.pad_left, 0, a.residual, x.typed_data(), we.typed_data(), se.typed_data(),
               be.typed_data(), taps.typed_data(), sd.typed_data(), bd.typed_data(), nullptr, nullptr, nullptr,
               a.e_lo, a.e_hi, a.d_lo, a.d_hi, -kInf, kInf, nullptr};
}

ffi::Error Check(const Block& b, size_t we_count, size_t taps_count) {
  if (b.e % 16 != 0 || b.e < 16) return ffi::Error::InvalidArgument("fused block training: E must be a multiple of 16");
  if (b.stride < 1 || b.stride > 2 || b.pad_top < 0 || b.pad_left < 0 || b.pad_top > 2 || b.pad_left > 2) {
    return ffi::Error::InvalidArgument("fused block training: stride 1 or 2 and pads in [0, 2]");
  }
  if (b.residual == 2 && (b.stride != 1 || b.oh != b.h || b.ow != b.w)) {
    return ffi::Error::InvalidArgument("fused block training: the inner shortcut needs stride 1");
  }
  if (we_count != static_cast<size_t>(b.cin * b.e) || taps_count != static_cast<size_t>(9 * b.e)) {
    return ffi::Error::InvalidArgument("fused block training: weight shapes do not match x and E");
  }
  return ffi::Error::Success();
}

ffi::Error Stats(ffi::ThreadPool pool, Vector x, Vector we, Vector se, Vector be, Vector taps, Result stats,
                 int64_t out_h, int64_t out_w, int64_t stride, int64_t pad_top, int64_t pad_left, float e_lo,
                 float e_hi) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("fused block training: x must be 4-d");
  const Attrs a{stride, pad_top, pad_left, 0, e_lo, e_hi, -kInf, kInf};
  const Block b = MakeBlock(x, we, se, be, taps, se, be, out_h, out_w, 0, a);
  if (auto err = Check(b, we.element_count(), taps.element_count()); err.failure()) return err;
  RunStats(pool, b, stats->typed_data());
  return ffi::Error::Success();
}

ffi::Error BwdSums(ffi::ThreadPool pool, Vector x, Vector we, Vector se, Vector be, Vector taps, Vector sd,
                   Vector bd, Vector wp_t, Vector gp, Result dwp, Result sums, int64_t stride, int64_t pad_top,
                   int64_t pad_left, int64_t residual, float e_lo, float e_hi, float d_lo, float d_hi) {
  const auto gd = gp.dimensions();
  if (x.dimensions().size() != 4 || gd.size() != 4) return ffi::Error::InvalidArgument("fused block training: 4-d x, g");
  const Attrs a{stride, pad_top, pad_left, residual, e_lo, e_hi, d_lo, d_hi};
  const Block b = MakeBlock(x, we, se, be, taps, sd, bd, gd[1], gd[2], gd[3], a);
  if (auto err = Check(b, we.element_count(), taps.element_count()); err.failure()) return err;
  RunBwdSums(pool, b, Grads{nullptr, wp_t.typed_data(), gp.typed_data(), nullptr}, dwp->typed_data(),
             sums->typed_data());
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::ThreadPool pool, Vector x, Vector we, Vector we_t, Vector se, Vector be, Vector taps, Vector sd,
               Vector bd, Vector wp_t, Vector gp, Vector coef, Result gx, Result dwe_taps, Result sums, int64_t stride,
               int64_t pad_top, int64_t pad_left, int64_t residual, float e_lo, float e_hi, float d_lo, float d_hi) {
  const auto gd = gp.dimensions();
  if (x.dimensions().size() != 4 || gd.size() != 4) return ffi::Error::InvalidArgument("fused block training: 4-d x, g");
  const Attrs a{stride, pad_top, pad_left, residual, e_lo, e_hi, d_lo, d_hi};
  const Block b = MakeBlock(x, we, se, be, taps, sd, bd, gd[1], gd[2], gd[3], a);
  if (auto err = Check(b, we.element_count(), taps.element_count()); err.failure()) return err;
  const Grads gr{we_t.typed_data(), wp_t.typed_data(), gp.typed_data(), coef.typed_data()};
  RunBwd(pool, b, gr, gx->typed_data(), dwe_taps->typed_data(), sums->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// The attributes of the two backward calls.
template <typename B>
auto WithTrainAttrs(B&& b) {
  return std::move(b)
      .template Attr<int64_t>("stride")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("residual")
      .template Attr<float>("e_lo")
      .template Attr<float>("e_hi")
      .template Attr<float>("d_lo")
      .template Attr<float>("d_hi");
}

using manifold::WithF32Args;
using manifold::WithF32Rets;

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldFusedBlockTrainStats, Stats,
                              WithF32Rets<1>(WithF32Args<5>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))
                                  .Attr<int64_t>("out_h")
                                  .Attr<int64_t>("out_w")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<float>("e_lo")
                                  .Attr<float>("e_hi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldFusedBlockTrainBwdSums, BwdSums,
                              WithTrainAttrs(WithF32Rets<2>(WithF32Args<9>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ManifoldFusedBlockTrainBwd, Bwd,
                              WithTrainAttrs(WithF32Rets<3>(WithF32Args<11>(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))));
