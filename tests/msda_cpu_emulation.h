// Runs cupy_kernels/msda.cu on the CPU, for tests on machines without a GPU.
// Every CUDA thread is a std::thread; a warp is 32 of them that meet at a barrier in every
// __shfl_xor_sync. A lane that skips a shuffle its warp-mates reach (a hang or garbage on a real
// GPU) leaves the barrier unfilled: after 5 s it breaks, and emu_run reports the failure.
// Atomics take a lock; a float4 atomic (sm_90's vector atomic, which the kernels use in emulation
// for runs of 4 floats) adds its four floats under the same lock.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <chrono>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#define DETLEARN_CPU_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

using std::max;
using std::min;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

template <class T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline long long __float2ll_rn(float x) { return llrintf(x); }   // default rounding: to nearest even
inline long long __double2ll_rn(double x) { return llrint(x); }
inline float __ll2float_rn(long long x) { return (float)x; }
inline double __ll2double_rn(long long x) { return (double)x; }
inline float detlearn_half_to_float(unsigned short x) { _Float16 h; memcpy(&h, &x, 2); return (float)h; }
inline unsigned short detlearn_float_to_half(float f) { _Float16 h = (_Float16)f; unsigned short x; memcpy(&x, &h, 2); return x; }

inline std::mutex emu_atomic_lock;
template <class T> inline T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> g(emu_atomic_lock);
  T old = *p;
  *p = old + v;
  return old;
}
inline float4 atomicAdd(float4* p, float4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16) throw "vector atomic on an address that is not 16-byte aligned";
  std::lock_guard<std::mutex> g(emu_atomic_lock);
  const float4 old = *p;
  *p = float4{old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w};
  return old;
}

inline std::atomic<bool> emu_shuffle_deadlock{false};

struct EmuBarrier {  // like std::barrier(32), but breaks (and says so) instead of waiting forever
  std::mutex m;
  std::condition_variable cv;
  int count = 0, generation = 0;
  bool broken = false;
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m);
    if (broken) return;
    const int gen = generation;
    if (++count == 32) { count = 0; ++generation; cv.notify_all(); return; }
    if (!cv.wait_for(lock, std::chrono::seconds(5), [&] { return gen != generation || broken; })) {
      broken = true;
      emu_shuffle_deadlock = true;
      cv.notify_all();
    }
  }
};

struct EmuWarp {
  EmuBarrier bar;
  double vals[32];
};
inline thread_local EmuWarp* emu_warp = nullptr;

template <class T> inline T __shfl_xor_sync(unsigned int mask, T v, int offset) {
  if (mask != 0xffffffffu) throw "only full-warp shuffles are emulated";
  const int lane = threadIdx.x % 32;
  emu_warp->vals[lane] = (double)v;
  emu_warp->bar.arrive_and_wait();
  const T r = (T)emu_warp->vals[lane ^ offset];
  emu_warp->bar.arrive_and_wait();
  return r;
}

// Run body() as every thread of a 1-d grid, one warp (32 std::threads) at a time.
template <class F> inline void emu_launch(unsigned int grid, unsigned int block, F body) {
  blockDim.x = block; gridDim.x = grid;
  for (unsigned int b = 0; b < grid; ++b)
    for (unsigned int w0 = 0; w0 < block; w0 += 32) {
      EmuWarp warp;
      std::vector<std::thread> lanes;
      for (unsigned int t = w0; t < w0 + 32 && t < block; ++t)
        lanes.emplace_back([&, b, t] { blockIdx.x = b; threadIdx.x = t; emu_warp = &warp; body(); });
      for (auto& th : lanes) th.join();
    }
}
