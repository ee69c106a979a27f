// Entry point for ctypes: emu_run(name, grid, block, slots) runs one kernel of msda.cu on the CPU.
// slots: the kernel's arguments in order, each in a 64-bit slot (pointers as addresses, ints as values).
#include "msda_cpu_emulation.h"
#include "msda.cu"
#include <string>

typedef unsigned long long u64;
#define P(T, i) reinterpret_cast<T>(s[i])
#define I(i) (int)(long long)s[i]

template <int DT, int V> void run_forward(unsigned g, unsigned b, const u64* s) {
  typedef typename Storage<DT>::T T; typedef typename Storage<DT>::A A;
  emu_launch(g, b, [&] { msda_forward<DT, V>(P(const T*, 0), P(const int*, 1), P(const int*, 2), P(const A*, 3),
                                             P(const A*, 4), P(T*, 5), I(6), I(7), I(8), I(9), I(10), I(11), I(12), I(13), I(14)); });
}
template <int DT, int V, int G, bool DET> void run_backward(unsigned g, unsigned b, const u64* s) {
  typedef typename Storage<DT>::T T; typedef typename Storage<DT>::A A;
  emu_launch(g, b, [&] { msda_backward<DT, V, G, DET>(P(const T*, 0), P(const int*, 1), P(const int*, 2), P(const A*, 3),
                                                      P(const A*, 4), P(const T*, 5), P(A*, 6), P(u64*, 7), P(const A*, 8),
                                                      P(A*, 9), P(A*, 10), I(11), I(12), I(13), I(14), I(15), I(16), I(17),
                                                      I(18), I(19), I(20)); });
}
template <int DT> void run_fixed(unsigned g, unsigned b, const u64* s) {
  typedef typename Storage<DT>::T T; typedef typename Storage<DT>::A A;
  emu_launch(g, b, [&] { msda_fixed_to_value<DT>(P(const u64*, 0), P(const A*, 1), P(T*, 2), I(3)); });
}

#define FWD(DT, V) if (n == "msda_forward<" #DT ", " #V ">") { run_forward<DT, V>(g, b, s); return 0; }
#define BWD(DT, V, G, DET) \
  if (n == "msda_backward<" #DT ", " #V ", " #G ", " #DET ">") { run_backward<DT, V, G, DET>(g, b, s); return 0; }
#define FIX(DT) if (n == "msda_fixed_to_value<" #DT ">") { run_fixed<DT>(g, b, s); return 0; }

static int run(const std::string& n, unsigned g, unsigned b, const u64* s) {
  FWD(0, 4) FWD(0, 1) FWD(1, 8) FWD(1, 1) FWD(2, 8) FWD(2, 1) FWD(3, 1)
  // every backward instantiation that detlearn.ops.msda_cupy.kernel_names lists
  BWD(0, 4, 1, false) BWD(0, 4, 1, true) BWD(0, 4, 4, false) BWD(0, 1, 1, false) BWD(0, 1, 1, true)
  BWD(1, 8, 1, false) BWD(1, 8, 1, true) BWD(1, 8, 4, false) BWD(1, 1, 1, false) BWD(1, 1, 1, true)
  BWD(2, 8, 1, false) BWD(2, 8, 1, true) BWD(2, 8, 4, false) BWD(2, 1, 1, false) BWD(2, 1, 1, true)
  BWD(3, 1, 1, false) BWD(3, 1, 1, true)
  FIX(0) FIX(1) FIX(2) FIX(3)
  return 1;  // unknown kernel name
}

// 0: ran; 1: unknown kernel name; 2: some lane skipped a warp shuffle that its warp-mates reached
extern "C" int emu_run(const char* name, unsigned g, unsigned b, const u64* s) {
  emu_shuffle_deadlock = false;
  const int status = run(name, g, b, s);
  return status ? status : (emu_shuffle_deadlock ? 2 : 0);
}
