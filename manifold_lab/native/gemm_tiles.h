// Register-blocked AVX-512 matrix products for the fused block kernels (fused_block.cc,
// fused_block_train.cc): C[M x N] (=, +=, or scale-bias-clamp) A[M x K] @ B[K x N], row-major
// with leading dimensions. Tiles of up to 8 x 48, 12 x 32 or 16 x 16 outputs in 24 zmm
// accumulators, the A operand broadcast from memory, no packing; masked loads and stores for
// widths that are not a multiple of 16, and ymm vectors for a last 8 columns.

#pragma once

#if !defined(__AVX512F__)
#error "the fused block kernels need AVX-512 (-march=native on a CPU with avx512f)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace manifold::tiles {

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

}  // namespace manifold::tiles
