// Multi-scale deformable attention (Deformable DETR / DINO): forward and backward CUDA kernels.
// Compiled at first use by CuPy (NVRTC) from detlearn.ops.msda_cupy; walked through line by line
// in nbs/11_ops_msda_cupy.ipynb.
//
// Layouts (all contiguous, row-major):
//   value       (B, S, H, C)        S = sum over levels of H_l * W_l, levels concatenated row-major
//   shapes      (L, 2) int32        (H_l, W_l) of every level
//   starts      (L,)   int32        first token of every level inside S
//   loc         (B, Q, H, L, P, 2)  (x, y) in [0, 1]; the pixel centre of column j is (j + 0.5) / W_l
//   attn        (B, Q, H, L, P)     attention weights
//   out         (B, Q, H, C)        = (B, Q, H*C)
//
// Template parameters
//   DT  storage type of value / out / grad_out: 0 float32, 1 float16, 2 bfloat16, 3 float64.
//       Arithmetic is done in A = float (double for DT 3): half and bfloat16 are only loaded,
//       converted and stored, never computed with, so the same source runs on sm_75 (T4).
//   V   channels per thread and chunk: 16 bytes worth (4 x fp32, 8 x fp16/bf16), or 1.
//   G   (backward) the thread's V channels are V / G runs of G consecutive channels, interleaved
//       with the other lanes' runs (see "thread mapping"): G = 1 on GPUs with scalar atomics, so
//       each atomic instruction of a group covers one contiguous run of T channels; G = 4 where
//       four floats go in one vector atomic (sm_90).
//   DET deterministic backward: the value gradient is accumulated in 64-bit fixed point, whose
//       integer additions give the same bits in any order.
//
// No header is included on purpose (cuda_fp16.h / cuda_bf16.h are not on NVRTC's path in every
// install): the conversions are one PTX instruction or a few bit operations. The only
// preprocessor switch, DETLEARN_CPU_EMULATION, lets tests/test_msda.py compile this file with g++
// and run it on the CPU (threads as lanes, a barrier per shuffle) where no GPU is available.

// ---------------------------------------------------------------- types and conversions
template <int DT> struct Storage { typedef unsigned short T; typedef float A; };  // fp16, bf16 bits
template <> struct Storage<0> { typedef float T; typedef float A; };
template <> struct Storage<3> { typedef double T; typedef double A; };

template <int DT> __device__ __forceinline__ typename Storage<DT>::A to_acc(typename Storage<DT>::T x);
template <> __device__ __forceinline__ float to_acc<0>(float x) { return x; }
template <> __device__ __forceinline__ double to_acc<3>(double x) { return x; }
template <> __device__ __forceinline__ float to_acc<1>(unsigned short x) {
#ifdef DETLEARN_CPU_EMULATION  // tests/msda_cpu_emulation.h runs this file on the CPU
  return detlearn_half_to_float(x);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));  // exact: every half is a float
  return f;
#endif
}
template <> __device__ __forceinline__ float to_acc<2>(unsigned short x) {
  return __uint_as_float(((unsigned int)x) << 16);  // bfloat16 = the top 16 bits of a float
}

template <int DT> __device__ __forceinline__ typename Storage<DT>::T from_acc(typename Storage<DT>::A x);
template <> __device__ __forceinline__ float from_acc<0>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<3>(double x) { return x; }
template <> __device__ __forceinline__ unsigned short from_acc<1>(float x) {
#ifdef DETLEARN_CPU_EMULATION
  return detlearn_float_to_half(x);
#else
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));  // round to nearest even, like torch
  return h;
#endif
}
template <> __device__ __forceinline__ unsigned short from_acc<2>(float x) {
  unsigned int u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0u;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                       // round to nearest even
  return (unsigned short)(u >> 16);
}

// ---------------------------------------------------------------- vector loads and stores
// G values starting at p, as A: one 16-byte load when G * sizeof(T) == 16, one 8-byte load when
// it is 8 (fp16/bf16 runs of 4), scalar loads otherwise. The host only picks G > 1 when C is a
// multiple of G and the base pointers are 16-byte aligned.
template <int DT, int G>
__device__ __forceinline__ void load_grain(const typename Storage<DT>::T* p, typename Storage<DT>::A* out) {
  typedef typename Storage<DT>::T T;
  constexpr int bytes = G * (int)sizeof(T);
  if constexpr (DT != 3 && (bytes == 16 || bytes == 8)) {
    unsigned int w[4];
    if constexpr (bytes == 16) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = raw.x; w[1] = raw.y; w[2] = raw.z; w[3] = raw.w;
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = raw.x; w[1] = raw.y;
    }
#pragma unroll
    for (int i = 0; i < bytes / 4; ++i) {
      if constexpr (DT == 0) {
        out[i] = __uint_as_float(w[i]);
      } else {  // two 16-bit values per word, the lower address in the low half (little endian)
        out[2 * i] = to_acc<DT>((unsigned short)(w[i] & 0xffffu));
        out[2 * i + 1] = to_acc<DT>((unsigned short)(w[i] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) out[i] = to_acc<DT>(__ldg(p + i));
  }
}

template <int DT, int V>
__device__ __forceinline__ void store_vec(typename Storage<DT>::T* p, const typename Storage<DT>::A (&in)[V]) {
  typedef typename Storage<DT>::T T;
  if constexpr (V * sizeof(T) == 16 && DT != 3) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (DT == 0) {
        w[i] = __float_as_uint(in[i]);
      } else {
        const unsigned int lo = from_acc<DT>(in[2 * i]), hi = from_acc<DT>(in[2 * i + 1]);
        w[i] = lo | (hi << 16);
      }
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_acc<DT>(in[i]);
  }
}

// ---------------------------------------------------------------- thread mapping
// A group of T threads (T a power of two <= 32, so groups never straddle a warp) owns one
// (b, q, h). In chunk k, lane `lane` owns V channels: V / G runs of G consecutive channels,
//   run r starts at channel  k * T * V + r * T * G + lane * G.
// For one (k, r) the T lanes cover T * G consecutive channels, so every load, store or atomic
// instruction of a group touches one contiguous run of memory. The forward uses G = V (one
// 16-byte load per corner); the backward G = 1 or 4 (see the value-gradient section).
__device__ __forceinline__ int run_channel(int k, int r, int lane, int T, int V, int G) {
  return k * T * V + r * T * G + lane * G;
}

// The V values of grad_out (or value) that a lane owns in chunk k; runs past C read as zero.
template <int DT, int V, int G>
__device__ __forceinline__ void load_runs(const typename Storage<DT>::T* row, int k, int lane, int T, int C,
                                          typename Storage<DT>::A (&out)[V]) {
#pragma unroll
  for (int r = 0; r < V / G; ++r) {
    const int c = run_channel(k, r, lane, T, V, G);
    if (c < C) {
      load_grain<DT, G>(row + c, out + r * G);
    } else {
#pragma unroll
      for (int i = 0; i < G; ++i) out[r * G + i] = 0;
    }
  }
}

// ---------------------------------------------------------------- value-gradient accumulation
// Default: floating-point atomics, one run of G floats per call. On sm_90 four floats go in one
// vector atomic (red.global.add.v4.f32); the CPU emulation takes that path too, so the tests
// cover it. Older GPUs add one float per instruction.
template <int G, typename A>
__device__ __forceinline__ void atomic_add_run(A* p, const A* v) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(DETLEARN_CPU_EMULATION)
  constexpr bool vector_atomics = G % 4 == 0 && sizeof(A) == 4;
#else
  constexpr bool vector_atomics = false;
#endif
  if constexpr (vector_atomics) {
#pragma unroll
    for (int i = 0; i < G; i += 4)
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) atomicAdd(p + i, v[i]);
  }
}

// Deterministic: round every contribution to a multiple of 1/scale and add the integers. Integer
// addition is associative, so the sum has the same bits whatever order the threads arrive in.
// The host picks scale (a power of two) so that no sum can overflow 2^63, and G = 1, so each
// 64-bit atomic instruction of a group covers T consecutive elements.
__device__ __forceinline__ long long to_fixed(float x, float scale) { return __float2ll_rn(x * scale); }
__device__ __forceinline__ long long to_fixed(double x, double scale) { return __double2ll_rn(x * scale); }

template <int G, typename A>
__device__ __forceinline__ void atomic_add_fixed(unsigned long long* p, const A* v, A scale) {
#pragma unroll
  for (int i = 0; i < G; ++i) atomicAdd(p + i, (unsigned long long)to_fixed(v[i], scale));
}

// ---------------------------------------------------------------- bilinear sampling
// grid_sample(align_corners=False, padding_mode='zeros'): pixel coordinate = loc * W - 0.5.
// The four neighbours (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1); a neighbour outside the
// map reads as zero. Every offset is clamped into the level, so the kernels issue all four loads
// unconditionally (their latencies overlap) and zero what `inside` rejects. A point with no
// neighbour inside (also a NaN coordinate, which fails every comparison) has all four rejected.
template <typename A>
struct Corners {
  int offset[4];   // element offset of each (clamped) neighbour's first channel, relative to (b, token 0, h)
  bool inside[4];
  A weight[4];
  A fx, fy;        // fractional position between the neighbours
};

template <typename A>
__device__ __forceinline__ void bilinear_corners(A loc_x, A loc_y, int Hl, int Wl, int start, int HC,
                                                 Corners<A>& c) {
  const A x = loc_x * (A)Wl - (A)0.5, y = loc_y * (A)Hl - (A)0.5;
  const bool any = x > (A)-1 && y > (A)-1 && x < (A)Wl && y < (A)Hl && Hl > 0 && Wl > 0;
  const A xs = any ? x : (A)0, ys = any ? y : (A)0;  // keeps the int conversion in range
  const A xf = floor(xs), yf = floor(ys);
  const int x0 = (int)xf, y0 = (int)yf;  // -1 <= x0 <= Wl - 1, -1 <= y0 <= Hl - 1
  c.fx = xs - xf;
  c.fy = ys - yf;
  c.weight[0] = ((A)1 - c.fy) * ((A)1 - c.fx);
  c.weight[1] = ((A)1 - c.fy) * c.fx;
  c.weight[2] = c.fy * ((A)1 - c.fx);
  c.weight[3] = c.fy * c.fx;
  c.inside[0] = any && y0 >= 0 && x0 >= 0;
  c.inside[1] = any && y0 >= 0 && x0 + 1 < Wl;
  c.inside[2] = any && y0 + 1 < Hl && x0 >= 0;
  c.inside[3] = any && y0 + 1 < Hl && x0 + 1 < Wl;
  const int xa = max(x0, 0), xb = max(min(x0 + 1, Wl - 1), 0);  // clamped columns and rows
  const int ya = max(y0, 0), yb = max(min(y0 + 1, Hl - 1), 0);
  c.offset[0] = (start + ya * Wl + xa) * HC;
  c.offset[1] = (start + ya * Wl + xb) * HC;
  c.offset[2] = (start + yb * Wl + xa) * HC;
  c.offset[3] = (start + yb * Wl + xb) * HC;
}

// ---------------------------------------------------------------- forward
// Mapping with G = V: lane owns channels [c0, c0 + V), c0 = (k * T + lane) * V for chunk k.
// Coordinates are computed once per point per thread (not once per channel); the next point's
// location and weight are loaded while the current one is summed; each output is written once.
template <int DT, int V>
__global__ void msda_forward(const typename Storage<DT>::T* __restrict__ value,
                             const int* __restrict__ shapes, const int* __restrict__ starts,
                             const typename Storage<DT>::A* __restrict__ loc,
                             const typename Storage<DT>::A* __restrict__ attn,
                             typename Storage<DT>::T* __restrict__ out,
                             const int B, const int S, const int Q, const int H, const int C,
                             const int L, const int P, const int T, const int chunks) {
  typedef typename Storage<DT>::A A;
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  const int group = tid / T;  // flat (b, q, h)
  const int lane = tid - group * T;
  if (group >= B * Q * H) return;  // no cooperation between threads here, so leaving early is safe
  const int h = group % H, b = group / (Q * H), HC = H * C, LP = L * P;
  const typename Storage<DT>::T* value_bh = value + (long long)b * S * HC + h * C;
  const int pt0 = group * LP;  // first (l, p) of this (b, q, h) in attn
  for (int k = 0; k < chunks; ++k) {
    const int c0 = (k * T + lane) * V;
    if (c0 >= C) break;
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = (A)0;
    A next_x = __ldg(loc + 2 * pt0), next_y = __ldg(loc + 2 * pt0 + 1), next_w = __ldg(attn + pt0);
    for (int l = 0; l < L; ++l) {
      const int Hl = __ldg(shapes + 2 * l), Wl = __ldg(shapes + 2 * l + 1), start = __ldg(starts + l);
      for (int p = 0; p < P; ++p) {
        const int pt = pt0 + l * P + p;
        const A lx = next_x, ly = next_y, w = next_w;
        if (l * P + p + 1 < LP) {  // prefetch the next point
          next_x = __ldg(loc + 2 * pt + 2);
          next_y = __ldg(loc + 2 * pt + 3);
          next_w = __ldg(attn + pt + 1);
        }
        Corners<A> cr;
        bilinear_corners<A>(lx, ly, Hl, Wl, start, HC, cr);
        A v[4][V];
#pragma unroll
        for (int j = 0; j < 4; ++j) load_grain<DT, V>(value_bh + cr.offset[j] + c0, v[j]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const A wj = w * cr.weight[j];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += wj * (cr.inside[j] ? v[j][i] : (A)0);
        }
      }
    }
    store_vec<DT, V>(out + group * C + c0, acc);
  }
}

// ---------------------------------------------------------------- backward
// Mapping with runs of G channels (thread mapping section). For every point a thread forms its
// channels' share of
//   d out / d attn  = sum_c g_c * sampled_c
//   d out / d x     = attn * W_l * sum_c g_c * d sampled_c / d x     (x = loc_x * W_l - 0.5)
//   d out / d y     = attn * H_l * sum_c g_c * d sampled_c / d y
// then the T threads of the group add their shares with a xor butterfly of warp shuffles (a fixed
// order, so these gradients are deterministic) and lane 0 writes them once: no atomics, no zero
// fill. The value gradient is scattered to the four neighbours with atomics (skipped when the
// value needs no gradient: value_grad == 0).
// Every thread of a warp runs the same L * P iterations and reaches every shuffle: threads past the
// last group stay in the loop as inactive (no loads, no stores), so the full mask is valid.
template <int DT, int V, int G, bool DET>
__global__ void msda_backward(const typename Storage<DT>::T* __restrict__ value,
                              const int* __restrict__ shapes, const int* __restrict__ starts,
                              const typename Storage<DT>::A* __restrict__ loc,
                              const typename Storage<DT>::A* __restrict__ attn,
                              const typename Storage<DT>::T* __restrict__ grad_out,
                              typename Storage<DT>::A* __restrict__ grad_value,         // (B, S, H, C), zeroed; !DET
                              unsigned long long* __restrict__ grad_value_fixed,        // (B, S, H, C), zeroed; DET
                              const typename Storage<DT>::A* __restrict__ fixed_scale,  // (1,); DET
                              typename Storage<DT>::A* __restrict__ grad_loc,           // (B, Q, H, L, P, 2)
                              typename Storage<DT>::A* __restrict__ grad_attn,          // (B, Q, H, L, P)
                              const int B, const int S, const int Q, const int H, const int C,
                              const int L, const int P, const int T, const int chunks, const int value_grad) {
  static_assert(V % G == 0, "a thread's channels are whole runs");
  typedef typename Storage<DT>::A A;
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = tid / T < B * Q * H;
  const int group = active ? tid / T : 0;  // inactive threads mirror group 0 but touch nothing
  const int lane = tid % T;
  const int h = group % H, b = group / (Q * H), HC = H * C, LP = L * P;
  const long long bh = (long long)b * S * HC + h * C;  // element offset of (b, token 0, h, 0)
  const int pt0 = group * LP;
  A scale = (A)0;
  if constexpr (DET) scale = __ldg(fixed_scale);
  A g_first[V];  // grad_out of chunk 0 stays in registers for all L * P points
  load_runs<DT, V, G>(grad_out + group * C, 0, lane, T, active ? C : 0, g_first);
  A next_x = __ldg(loc + 2 * pt0), next_y = __ldg(loc + 2 * pt0 + 1), next_w = __ldg(attn + pt0);
  for (int l = 0; l < L; ++l) {
    const int Hl = __ldg(shapes + 2 * l), Wl = __ldg(shapes + 2 * l + 1), start = __ldg(starts + l);
    for (int p = 0; p < P; ++p) {
      const int pt = pt0 + l * P + p;
      const A lx = next_x, ly = next_y, w = next_w;
      if (l * P + p + 1 < LP) {  // prefetch the next point
        next_x = __ldg(loc + 2 * pt + 2);
        next_y = __ldg(loc + 2 * pt + 3);
        next_w = __ldg(attn + pt + 1);
      }
      A gw = (A)0, gx = (A)0, gy = (A)0;  // this thread's share of the three sums
      Corners<A> cr;
      bilinear_corners<A>(lx, ly, Hl, Wl, start, HC, cr);
      for (int k = 0; k < chunks; ++k) {
        if (!active || run_channel(k, 0, lane, T, V, G) >= C) break;
        A g[V];
        if (k == 0) {
#pragma unroll
          for (int i = 0; i < V; ++i) g[i] = g_first[i];
        } else {
          load_runs<DT, V, G>(grad_out + group * C, k, lane, T, C, g);
        }
        A v[4][V];
#pragma unroll
        for (int j = 0; j < 4; ++j) load_runs<DT, V, G>(value + bh + cr.offset[j], k, lane, T, C, v[j]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int i = 0; i < V; ++i) v[j][i] = cr.inside[j] ? v[j][i] : (A)0;  // zero padding
        }
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A top = v[0][i] + cr.fx * (v[1][i] - v[0][i]);     // row y0, interpolated along x
          const A bottom = v[2][i] + cr.fx * (v[3][i] - v[2][i]);  // row y0 + 1
          gw += g[i] * (top + cr.fy * (bottom - top));
          gx += g[i] * (((A)1 - cr.fy) * (v[1][i] - v[0][i]) + cr.fy * (v[3][i] - v[2][i]));
          gy += g[i] * (bottom - top);
        }
        if (!value_grad) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!cr.inside[j]) continue;
          A contrib[V];
          const A wj = w * cr.weight[j];
#pragma unroll
          for (int i = 0; i < V; ++i) contrib[i] = wj * g[i];
#pragma unroll
          for (int r = 0; r < V / G; ++r) {
            const int c = run_channel(k, r, lane, T, V, G);
            if (c >= C) break;
            const long long at = bh + cr.offset[j] + c;
            if constexpr (DET) atomic_add_fixed<G, A>(grad_value_fixed + at, contrib + r * G, scale);
            else atomic_add_run<G, A>(grad_value + at, contrib + r * G);
          }
        }
      }
      // groups are aligned runs of T lanes, so xor offsets < T never leave the group
      for (int offset = T / 2; offset > 0; offset >>= 1) {
        gw += __shfl_xor_sync(0xffffffffu, gw, offset);
        gx += __shfl_xor_sync(0xffffffffu, gx, offset);
        gy += __shfl_xor_sync(0xffffffffu, gy, offset);
      }
      if (active && lane == 0) {
        grad_attn[pt] = gw;
        grad_loc[2 * pt] = w * gx * (A)Wl;
        grad_loc[2 * pt + 1] = w * gy * (A)Hl;
      }
    }
  }
}

// Deterministic mode, last step: fixed point -> the value's dtype.
template <int DT>
__global__ void msda_fixed_to_value(const unsigned long long* __restrict__ acc,
                                    const typename Storage<DT>::A* __restrict__ fixed_scale,
                                    typename Storage<DT>::T* __restrict__ out, const int n) {
  typedef typename Storage<DT>::A A;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long x = (long long)acc[i];
  if constexpr (sizeof(A) == 8) out[i] = from_acc<DT>((A)__ll2double_rn(x) / __ldg(fixed_scale));
  else out[i] = from_acc<DT>(__ll2float_rn(x) / __ldg(fixed_scale));  // scale is a power of two: exact
}
