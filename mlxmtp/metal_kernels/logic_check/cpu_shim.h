// Runs a Metal kernel body as C++ on the CPU (issue #10: an off-Mac check of the kernel's own logic).
//
// What it maps: the address-space qualifiers (device, constant, thread, threadgroup) to nothing; uint / ulong /
// uint3; half and bfloat16_t to _Float16 and a round-to-nearest-even bfloat16 struct; simd_sum to a real
// reduction over the 32 lanes of a simdgroup, each lane a POSIX thread that waits at a barrier, so a lane that skips
// a simd_sum its simdgroup executes deadlocks here as it would misbehave on a GPU (the caller sets a timeout).
// The grid runs threadgroup after threadgroup, every thread of a threadgroup in its own POSIX thread.
// What it cannot show: Metal compilation, memory coalescing and speed, the GPU's float rounding of fused ops.
#pragma once

#include <pthread.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace shim {  // pthreads, not std::thread / std::barrier: their headers triple the compile time

struct uint3 {
  uint32_t x, y, z;
};

struct Simdgroup {
  pthread_barrier_t bar;
  float vals[32];
};

inline thread_local Simdgroup* tl_simdgroup = nullptr;
inline thread_local uint32_t tl_lane = 0;

inline float simd_sum(float v) {
  Simdgroup* sg = tl_simdgroup;
  sg->vals[tl_lane] = v;
  pthread_barrier_wait(&sg->bar);
  float s = 0.0f;
  for (int i = 0; i < 32; i++) {
    s += sg->vals[i];
  }
  pthread_barrier_wait(&sg->bar);  // nobody overwrites vals before every lane has read them
  return s;
}

template <class F>
struct Grid {
  uint3 threadgroups;
  F* body;
  std::vector<Simdgroup> simdgroups;
  pthread_barrier_t all;
};

template <class F>
struct Lane {
  Grid<F>* grid;
  uint32_t t;
};

template <class F>
void* run_lane(void* arg) {
  auto* l = static_cast<Lane<F>*>(arg);
  Grid<F>& g = *l->grid;
  tl_simdgroup = &g.simdgroups[l->t / 32];
  tl_lane = l->t % 32;
  for (uint32_t z = 0; z < g.threadgroups.z; z++)
    for (uint32_t y = 0; y < g.threadgroups.y; y++)
      for (uint32_t x = 0; x < g.threadgroups.x; x++) {
        (*g.body)(uint3{x, y, z}, l->t % 32, l->t / 32);
        pthread_barrier_wait(&g.all);  // threadgroups run one after another
      }
  return nullptr;
}

// body(threadgroup_position_in_grid, thread_index_in_simdgroup, simdgroup_index_in_threadgroup)
template <class F>
void run_grid(uint3 threadgroups, uint32_t simdgroups, F body) {
  const uint32_t n_threads = 32 * simdgroups;
  Grid<F> g{threadgroups, &body, std::vector<Simdgroup>(simdgroups), {}};
  for (auto& sg : g.simdgroups) pthread_barrier_init(&sg.bar, nullptr, 32);
  pthread_barrier_init(&g.all, nullptr, n_threads);
  std::vector<Lane<F>> lanes(n_threads);
  std::vector<pthread_t> threads(n_threads);
  for (uint32_t t = 0; t < n_threads; t++) {
    lanes[t] = Lane<F>{&g, t};
    pthread_create(&threads[t], nullptr, run_lane<F>, &lanes[t]);
  }
  for (auto& th : threads) pthread_join(th, nullptr);
}

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even (NaN inputs do not occur in these checks)
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

}  // namespace shim

// ---- Metal names (after every system header, which may use these words) ----
#define device
#define constant
#define thread
#define threadgroup
using uint = uint32_t;
using ulong = uint64_t;
using half = _Float16;
using float16_t = _Float16;
using shim::bfloat16_t;
using shim::simd_sum;
using shim::uint3;
