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
//   V   channels per thread: 16 bytes worth (4 x fp32, 8 x fp16/bf16) for one vector load, or 1.
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
// V values starting at p, as A. With V * sizeof(T) == 16 this is one 16-byte load (the host
// only picks that V when C is a multiple of V and the base pointer is 16-byte aligned).
template <int DT, int V>
__device__ __forceinline__ void load_vec(const typename Storage<DT>::T* p, typename Storage<DT>::A (&out)[V]) {
  typedef typename Storage<DT>::T T;
  if constexpr (V * sizeof(T) == 16 && DT != 3) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (DT == 0) {
        out[i] = __uint_as_float(w[i]);
      } else {  // two 16-bit values per word, the lower address in the low half (little endian)
        out[2 * i] = to_acc<DT>((unsigned short)(w[i] & 0xffffu));
        out[2 * i + 1] = to_acc<DT>((unsigned short)(w[i] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_acc<DT>(__ldg(p + i));
  }
}

template <int DT, int V>
__device__ __forceinline__ void store_vec(typename Storage<DT>::T* p, const typename Storage<DT>::A (&in)[V]) {
  typedef typename Storage<DT>::T T;
  if constexpr (V * sizeof(T) == 16 && DT != 3) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (DT == 0) w[i] = __float_as_uint(in[i]);
      else w[i] = (unsigned int)from_acc<DT>(in[2 * i]) | ((unsigned int)from_acc<DT>(in[2 * i + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_acc<DT>(in[i]);
  }
}

// ---------------------------------------------------------------- value-gradient accumulation
// Default: floating-point atomics. On sm_90 four floats go in one vector atomic (red.global.add.v4.f32).
template <int V, typename A>
__device__ __forceinline__ void atomic_add_vec(A* p, const A (&v)[V]) {
#if __CUDA_ARCH__ >= 900
  constexpr bool vector_atomics = V % 4 == 0 && sizeof(A) == 4;
#else
  constexpr bool vector_atomics = false;
#endif
  if constexpr (vector_atomics) {
#pragma unroll
    for (int i = 0; i < V; i += 4)
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);
  }
}

// Deterministic: round every contribution to a multiple of 1/scale and add the integers. Integer
// addition is associative, so the sum has the same bits whatever order the threads arrive in.
// The host picks scale (a power of two) so that no sum can overflow 2^63.
__device__ __forceinline__ long long to_fixed(float x, float scale) { return __float2ll_rn(x * scale); }
__device__ __forceinline__ long long to_fixed(double x, double scale) { return __double2ll_rn(x * scale); }

template <int V, typename A>
__device__ __forceinline__ void atomic_add_fixed(unsigned long long* p, const A (&v)[V], A scale) {
#pragma unroll
  for (int i = 0; i < V; ++i) atomicAdd(p + i, (unsigned long long)to_fixed(v[i], scale));
}

// ---------------------------------------------------------------- bilinear sampling
// grid_sample(align_corners=False, padding_mode='zeros'): pixel coordinate = loc * W - 0.5.
// The four neighbours (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1); a neighbour outside the
// map reads as zero. Returns false when no neighbour is inside (also for NaN coordinates).
template <typename A>
struct Corners {
  int offset[4];   // element offset of each neighbour's first channel, relative to (b, level 0, h)
  bool inside[4];
  A weight[4];
  A fx, fy;        // fractional position between the neighbours
};

template <typename A>
__device__ __forceinline__ bool bilinear_corners(A loc_x, A loc_y, int Hl, int Wl, int start, int HC, Corners<A>& c) {
  const A x = loc_x * (A)Wl - (A)0.5, y = loc_y * (A)Hl - (A)0.5;
  if (!(x > (A)-1 && y > (A)-1 && x < (A)Wl && y < (A)Hl)) return false;
  const A xf = floor(x), yf = floor(y);
  const int x0 = (int)xf, y0 = (int)yf;  // -1 <= x0 <= Wl - 1, -1 <= y0 <= Hl - 1
  c.fx = x - xf;
  c.fy = y - yf;
  c.weight[0] = ((A)1 - c.fy) * ((A)1 - c.fx);
  c.weight[1] = ((A)1 - c.fy) * c.fx;
  c.weight[2] = c.fy * ((A)1 - c.fx);
  c.weight[3] = c.fy * c.fx;
  c.inside[0] = y0 >= 0 && x0 >= 0;
  c.inside[1] = y0 >= 0 && x0 + 1 < Wl;
  c.inside[2] = y0 + 1 < Hl && x0 >= 0;
  c.inside[3] = y0 + 1 < Hl && x0 + 1 < Wl;
  const int base = start + y0 * Wl + x0;  // token index of (y0, x0); only used where inside
  c.offset[0] = base * HC;
  c.offset[1] = (base + 1) * HC;
  c.offset[2] = (base + Wl) * HC;
  c.offset[3] = (base + Wl + 1) * HC;
  return true;
}

// ---------------------------------------------------------------- forward
// Thread mapping: a group of T threads (T a power of two <= 32) owns one (b, q, h); thread `lane`
// owns channels [c0, c0 + V) with c0 = (k * T + lane) * V for chunk k < chunks. Coordinates are
// computed once per point per thread (not once per channel); each output is written once.
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
  const int h = group % H, b = group / (Q * H), HC = H * C;
  const typename Storage<DT>::T* value_bh = value + (long long)b * S * HC + h * C;
  const int pt0 = group * L * P;  // first (l, p) of this (b, q, h) in attn
  for (int k = 0; k < chunks; ++k) {
    const int c0 = (k * T + lane) * V;
    if (c0 >= C) break;
    A acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = (A)0;
    for (int l = 0; l < L; ++l) {
      const int Hl = __ldg(shapes + 2 * l), Wl = __ldg(shapes + 2 * l + 1), start = __ldg(starts + l);
      for (int p = 0; p < P; ++p) {
        const int pt = pt0 + l * P + p;
        Corners<A> cr;
        if (!bilinear_corners<A>(__ldg(loc + 2 * pt), __ldg(loc + 2 * pt + 1), Hl, Wl, start, HC, cr)) continue;
        const A w = __ldg(attn + pt);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!cr.inside[j]) continue;
          A v[V];
          load_vec<DT, V>(value_bh + cr.offset[j] + c0, v);
          const A wj = w * cr.weight[j];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += wj * v[i];
        }
      }
    }
    store_vec<DT, V>(out + group * C + c0, acc);
  }
}

// ---------------------------------------------------------------- backward
// Same mapping as the forward. For every point a thread forms its channels' share of
//   d out / d attn  = sum_c g_c * sampled_c
//   d out / d x     = attn * W_l * sum_c g_c * d sampled_c / d x     (x = loc_x * W_l - 0.5)
//   d out / d y     = attn * H_l * sum_c g_c * d sampled_c / d y
// then the T threads of the group add their shares with a xor butterfly of warp shuffles (a fixed
// order, so these gradients are deterministic) and lane 0 writes them once: no atomics, no zero
// fill. The value gradient is scattered to the four neighbours with atomics.
// Every thread of a warp runs the same L * P iterations and reaches every shuffle: threads past the
// last group stay in the loop as inactive (no loads, no stores), so the full mask is valid.
template <int DT, int V, bool DET>
__global__ void msda_backward(const typename Storage<DT>::T* __restrict__ value,
                              const int* __restrict__ shapes, const int* __restrict__ starts,
                              const typename Storage<DT>::A* __restrict__ loc,
                              const typename Storage<DT>::A* __restrict__ attn,
                              const typename Storage<DT>::T* __restrict__ grad_out,
                              typename Storage<DT>::A* __restrict__ grad_value,             // (B, S, H, C), zeroed; !DET
                              unsigned long long* __restrict__ grad_value_fixed,            // (B, S, H, C), zeroed; DET
                              const typename Storage<DT>::A* __restrict__ fixed_scale,      // (1,); DET
                              typename Storage<DT>::A* __restrict__ grad_loc,               // (B, Q, H, L, P, 2)
                              typename Storage<DT>::A* __restrict__ grad_attn,              // (B, Q, H, L, P)
                              const int B, const int S, const int Q, const int H, const int C,
                              const int L, const int P, const int T, const int chunks) {
  typedef typename Storage<DT>::A A;
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  const int n_groups = B * Q * H;
  const bool active = tid / T < n_groups;
  const int group = active ? tid / T : 0;  // inactive threads mirror group 0 but touch nothing
  const int lane = tid % T;
  const int h = group % H, b = group / (Q * H), HC = H * C;
  const long long bh = (long long)b * S * HC + h * C;  // element offset of (b, token 0, h, 0)
  const int pt0 = group * L * P;
  A scale = (A)0;
  if constexpr (DET) scale = __ldg(fixed_scale);
  A g_first[V] = {};  // grad_out of chunk 0 stays in registers for all L * P points
  if (active && lane * V < C) load_vec<DT, V>(grad_out + group * C + lane * V, g_first);
  for (int l = 0; l < L; ++l) {
    const int Hl = __ldg(shapes + 2 * l), Wl = __ldg(shapes + 2 * l + 1), start = __ldg(starts + l);
    for (int p = 0; p < P; ++p) {
      const int pt = pt0 + l * P + p;
      const A w = __ldg(attn + pt);
      A gw = (A)0, gx = (A)0, gy = (A)0;  // this thread's share of the three sums
      Corners<A> cr;
      if (bilinear_corners<A>(__ldg(loc + 2 * pt), __ldg(loc + 2 * pt + 1), Hl, Wl, start, HC, cr)) {
        for (int k = 0; k < chunks; ++k) {
          const int c0 = (k * T + lane) * V;
          if (!active || c0 >= C) break;
          A g[V];
          if (k == 0) {
#pragma unroll
            for (int i = 0; i < V; ++i) g[i] = g_first[i];
          } else {
            load_vec<DT, V>(grad_out + group * C + c0, g);
          }
          A v[4][V];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (cr.inside[j]) load_vec<DT, V>(value + bh + cr.offset[j] + c0, v[j]);
            else {
#pragma unroll
              for (int i = 0; i < V; ++i) v[j][i] = (A)0;
            }
          }
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A top = v[0][i] + cr.fx * (v[1][i] - v[0][i]);  // row y0, interpolated along x
            const A bottom = v[2][i] + cr.fx * (v[3][i] - v[2][i]);  // row y0 + 1
            gw += g[i] * (top + cr.fy * (bottom - top));
            gx += g[i] * (((A)1 - cr.fy) * (v[1][i] - v[0][i]) + cr.fy * (v[3][i] - v[2][i]));
            gy += g[i] * (bottom - top);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (!cr.inside[j]) continue;
            A contrib[V];
            const A wj = w * cr.weight[j];
#pragma unroll
            for (int i = 0; i < V; ++i) contrib[i] = wj * g[i];
            if constexpr (DET) atomic_add_fixed<V, A>(grad_value_fixed + bh + cr.offset[j] + c0, contrib, scale);
            else atomic_add_vec<V, A>(grad_value + bh + cr.offset[j] + c0, contrib);
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
