// Shared by the native kernels: a deadlock-free parallel loop over XLA's intra-op thread pool
// and a 16-float vector type.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace manifold {

// Runs body(task) for task in [0, tasks) on the calling thread and on up to num_threads - 1
// helpers from XLA's pool. The caller never waits on a helper that has not started: it takes
// tasks itself and waits only for tasks that a running helper has taken, so it cannot deadlock
// when the pool is busy. Late helpers find no task left and return.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t tasks = 0;
    const Body* body = nullptr;
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  state->tasks = tasks;
  state->body = &body;
  auto work = [state]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < state->tasks;) {
      (*state->body)(t);
      if (state->done.fetch_add(1) + 1 == state->tasks) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == state->tasks; });
}

// Rows per task: enough work per task to amortise scheduling, enough tasks to balance.
inline int64_t RowsPerTask(int64_t rows, int64_t row_elems) {
  const int64_t target = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, row_elems));
  return std::max<int64_t>(1, std::min<int64_t>(target, rows / 16));
}

// The element-wise sum of `chunks` partial arrays of `width` values each (chunk t at
// partial[t * width]), added in chunk order in float64: a result independent of which thread
// filled which chunk.
template <typename T>
std::vector<double> SumInOrder(const std::vector<T>& partial, int64_t chunks, int64_t width) {
  std::vector<double> total(width, 0.0);
  for (int64_t t = 0; t < chunks; ++t) {
    for (int64_t e = 0; e < width; ++e) total[e] += partial[t * width + e];
  }
  return total;
}

// The FFI binding of a strided convolution call: two float32 inputs, one float32 result and
// the stride and leading pads as attributes.
inline auto StridedConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left");
}

// A binding with N (at least 1) more float32 buffer arguments, or results: for the kernels that
// take many. (Bindings cannot be copied or moved, only extended: each step returns a new one.)
template <int N, typename B>
auto WithF32Args(B&& b) {
  if constexpr (N == 1) {
    return std::move(b).template Arg<ffi::Buffer<ffi::F32>>();
  } else {
    return WithF32Args<N - 1>(std::move(b).template Arg<ffi::Buffer<ffi::F32>>());
  }
}

template <int N, typename B>
auto WithF32Rets(B&& b) {
  if constexpr (N == 1) {
    return std::move(b).template Ret<ffi::Buffer<ffi::F32>>();
  } else {
    return WithF32Rets<N - 1>(std::move(b).template Ret<ffi::Buffer<ffi::F32>>());
  }
}

// 16 floats in one (AVX-512) or two (AVX2, NEON: four) vector registers; aligned(4) makes loads
// and stores through a pointer to it unaligned ones.
typedef float Vec __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

typedef int32_t Mask __attribute__((vector_size(64), aligned(4)));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// A store that bypasses the caches (no read of the line before it is written) where p is
// 64-byte aligned and the CPU has AVX-512; a plain store elsewhere. For outputs far larger than
// the caches, which the next operation reads from memory anyway. Call StreamFence() before the
// results are handed to another thread.
inline void StoreStream(float* p, Vec v) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  }
#endif
  Store(p, v);
}

inline void StreamFence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Outputs of at least this many bytes are written with StoreStream.
constexpr int64_t kStreamBytes = 16 << 20;

// v where lo < z < hi, else 0, lane-wise, as a bit mask on registers. The empty asm keeps v in
// a register: otherwise GCC folds the mask into v's load as an AVX-512 zero-masking load, which
// made the whole loop twice as slow on AMD Zen 5.
inline Vec KeepInside(Vec v, Vec z, float lo, float hi) {
#if defined(__x86_64__)
  asm("" : "+v"(v));
#endif
  const Mask inside = (z > (Vec{} + lo)) & (z < (Vec{} + hi));
  return (Vec)((Mask)v & inside);
}

}  // namespace manifold
