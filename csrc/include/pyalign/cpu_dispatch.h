// Run-time ISA dispatch and row-parallel loops for the CPU kernels. A kernel is written once as
// an always-inline row function; PYALIGN_CPU_CLONES compiles it for AVX-512, AVX2+FMA and the
// baseline, and the dispatcher picks the best one the CPU supports, so one wheel stays portable.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyalign {

#define PYALIGN_CPU_INLINE inline __attribute__((always_inline))

enum class Isa { base, avx2, avx512 };

inline const char* isa_name(Isa i) {
  return i == Isa::avx512 ? "avx512" : i == Isa::avx2 ? "avx2" : "baseline";
}

// The best level this CPU supports.
inline Isa supported_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::base;
  }();
  return isa;
#else
  return Isa::base;
#endif
}

// The level the kernels dispatch to: the supported one, or a lower one named by the environment
// variable PYALIGN_CPU_ISA ("baseline", "avx2", "avx512"), read once, so that the tests can run
// every code path on one machine. An unknown or unsupported value is ignored here and refused by
// `import pyalign` (pyalign/_ext.py), which compares the request with cpu_isa().
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa best = supported_isa();
    const char* env = std::getenv("PYALIGN_CPU_ISA");
    if (env == nullptr) return best;
    for (Isa i : {Isa::base, Isa::avx2, Isa::avx512})
      if (std::strcmp(env, isa_name(i)) == 0 && int(i) <= int(best)) return i;
    return best;
  }();
  return isa;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PYALIGN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define PYALIGN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PYALIGN_TARGET_AVX512
#define PYALIGN_TARGET_AVX2
#endif

// Defines NAME<Ts...>(ctx, begin, end) that runs ROWFN<Ts...>(ctx, i) for i in [begin, end),
// compiled three times with different ISA targets and dispatched at run time.
#define COMMA ,
#define PYALIGN_CPU_CLONES(NAME, ROWFN, CTX, TPARAMS, TARGS)                         \
  template <TPARAMS> PYALIGN_TARGET_AVX512 void NAME##_avx512(const CTX& c, int64_t b, \
                                                              int64_t e) {            \
    for (int64_t i = b; i < e; ++i) ROWFN<TARGS>(c, i);                               \
  }                                                                                   \
  template <TPARAMS> PYALIGN_TARGET_AVX2 void NAME##_avx2(const CTX& c, int64_t b,     \
                                                          int64_t e) {                \
    for (int64_t i = b; i < e; ++i) ROWFN<TARGS>(c, i);                               \
  }                                                                                   \
  template <TPARAMS> void NAME##_base(const CTX& c, int64_t b, int64_t e) {            \
    for (int64_t i = b; i < e; ++i) ROWFN<TARGS>(c, i);                               \
  }                                                                                   \
  template <TPARAMS> void NAME(const CTX& c, int64_t b, int64_t e) {                   \
    switch (cpu_isa()) {                                                              \
      case Isa::avx512: NAME##_avx512<TARGS>(c, b, e); break;                         \
      case Isa::avx2: NAME##_avx2<TARGS>(c, b, e); break;                             \
      default: NAME##_base<TARGS>(c, b, e);                                           \
    }                                                                                 \
  }

// Fixed-lane sums of the tiled CPU loops (rl.cpp, losses.cpp): a loop handles kTile elements at a
// time and each sum is kept in kLanes lanes, element j of a segment in lane j % kLanes.
constexpr int kTile = 256, kLanes = 16;
static_assert(kTile % kLanes == 0 && (kTile & (kTile - 1)) == 0 && kLanes <= kTile,
              "a token's lane must not depend on its tile; the tile's tree halves down to kLanes");

// Adds one tile's `values[0, n)` into the lanes: token j of a segment goes to lane j % kLanes (tiles
// hold kTile tokens, a multiple of kLanes). Within the tile the lane sums are a fixed pairwise tree
// (halving strides down to kLanes, each stage one loop without a carried dependency, so it
// vectorizes); the tile's kLanes partial sums are then added to the lanes in tile order. The order of
// every addition is fixed by this code, so the bits do not depend on the vector width.
template <typename A> PYALIGN_CPU_INLINE void add_lanes(A* __restrict lanes, A* __restrict values, int n) {
  for (int j = n; j < kTile; ++j) values[j] = A(0);
  for (int s = kTile / 2; s >= kLanes; s /= 2)
#pragma omp simd
    for (int j = 0; j < s; ++j) values[j] += values[j + s];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) lanes[l] += values[l];
}
template <typename A> PYALIGN_CPU_INLINE A lane_total(const A* lanes) {
  A sum = A(0);
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// Runs fn(begin, end) over [0, n) in contiguous static chunks across OpenMP threads. Each index
// is processed entirely by one thread, so results never depend on the thread count. The first
// exception thrown by any thread is rethrown on the caller's thread.
template <typename F> void parallel_rows(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  std::exception_ptr err;
  std::mutex mu;
  auto guarded = [&](int64_t b, int64_t e) {
    try { fn(b, e); } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!err) err = std::current_exception();
    }
  };
#ifdef _OPENMP
  if (n >= 2 * grain && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
    {
      int nt = omp_get_num_threads(), t = omp_get_thread_num();
      int64_t chunk = (n + nt - 1) / nt;
      int64_t b = t * chunk, e = b + chunk < n ? b + chunk : n;
      if (b < e) guarded(b, e);
    }
  } else {
    guarded(0, n);
  }
#else
  guarded(0, n);
#endif
  if (err) std::rethrow_exception(err);
}

}  // namespace pyalign
