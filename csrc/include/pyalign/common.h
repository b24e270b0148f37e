// Portable math and types shared by the CPU and CUDA kernels of every family.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define PYALIGN_HD __host__ __device__ __forceinline__
#else
#define PYALIGN_HD inline __attribute__((always_inline))
#endif

namespace pyalign {

// The descriptors' dtype codes; exported by name through contract.h (kDTypeNames).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, i32 = 4, i64 = 5, u8 = 6, b8 = 7 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
    case DType::b8: return "bool";
  }
  return "unknown";
}

// 16-bit float storage types: plain bit patterns, converted by hand so that the same code
// runs on host and device and vectorizes on the host.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

PYALIGN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
PYALIGN_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

PYALIGN_HD float to_float(float x) { return x; }
PYALIGN_HD double to_float(double x) { return x; }
PYALIGN_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
PYALIGN_HD float to_float(f16_t x) {
  // Branch-free half -> float (handles subnormals, inf and NaN) so loops over it vectorize.
  uint32_t h = x.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  uint32_t normal = (em << 13) + 0x38000000u;             // rebias exponent 15 -> 127
  uint32_t infnan = (em << 13) | 0x7f800000u;             // exponent 31 -> 255
  float sub = bits_to_float((em << 13) + 0x38800000u) - bits_to_float(0x38800000u);  // exponent 0
  uint32_t subb = float_to_bits(sub);
  uint32_t r = em >= 0x7c00u ? infnan : (em < 0x0400u ? subb : normal);
  return bits_to_float(r | sign);
}

template <typename T> PYALIGN_HD T from_float(float x);
template <> PYALIGN_HD float from_float<float>(float x) { return x; }
template <> PYALIGN_HD bf16_t from_float<bf16_t>(float x) {
  // Round to nearest even; NaN stays NaN.
  uint32_t u = float_to_bits(x);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  bool isnan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{uint16_t(isnan ? nan : rounded)};
}
template <> PYALIGN_HD f16_t from_float<f16_t>(float x) {
#if defined(__CUDA_ARCH__)
  __half h = __float2half_rn(x);
  return f16_t{__half_as_ushort(h)};
#else
  // Round to nearest even, overflow to inf, gradual underflow; selects only, so it vectorizes.
  uint32_t u = float_to_bits(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;         // rebias 127 -> 15, round
  uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;  // the FPU rounds at 2^-24
  uint32_t out = a > 0x7f800000u ? 0x7e00u                               // NaN
               : a >= 0x477ff000u ? 0x7c00u                              // >= 65520 rounds to inf
               : a < 0x38800000u ? sub : normal;                         // below the smallest normal
  return f16_t{uint16_t(out | sign)};
#endif
}
template <> PYALIGN_HD double from_float<double>(float x) { return x; }

// Rounds an accumulator value to the storage type T; fp64 stays fp64 (the gradcheck dtype).
template <typename T, typename A> PYALIGN_HD T to_storage(A v) { return from_float<T>(float(v)); }
template <> PYALIGN_HD double to_storage<double, double>(double v) { return v; }

template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

// acc_type and the floating-point types again, for dtype codes (the bindings' checks).
constexpr bool is_float_dtype(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64; }
constexpr DType accumulation_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

// exp that the host compiler can inline and vectorize (#pragma omp simd): Cody-Waite range
// reduction to |r| <= ln2/2 and a degree-6 polynomial (max rel. error ~2 ulp). Exact 0 below
// -87.3 (so -inf logits give exactly 0), +inf above 88.7, NaN propagates.
// exp_clamped is the core, for an argument already clamped to [-87, 88].
PYALIGN_HD float exp_clamped(float xc) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = xc * 1.44269504f + shifter;
  float n = t - shifter;
  float r = xc - n * 0.693145752f;    // ln2 split in a high and a low part
  r = r - n * 1.42860677e-6f;
  float p = 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ni = int32_t(float_to_bits(t) - float_to_bits(shifter));
  return p * bits_to_float(uint32_t(ni + 127) << 23);
}
PYALIGN_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  float y = exp_clamped(xc);
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.0f ? INFINITY : y;
  return x != x ? x : y;
#endif
}
PYALIGN_HD double fast_exp(double x) { return std::exp(x); }

// fast_exp of an argument known to be <= 0 or NaN (a logit minus its row's maximum): the same
// value (NaN stays NaN, through the arithmetic), without the overflow clamp and the two selects
// that only matter above 0.
PYALIGN_HD float fast_exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float y = exp_clamped(x < -87.0f ? -87.0f : x);
  return x < -87.0f ? 0.0f : y;
#endif
}
PYALIGN_HD double fast_exp_nonpos(double x) { return std::exp(x); }

// fast_exp of an argument known to lie in [-87, 88] or be NaN (a clamped log-ratio): the same value
// without the range clamps and their selects.
PYALIGN_HD float fast_exp_bounded(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_clamped(x);
#endif
}
PYALIGN_HD double fast_exp_bounded(double x) { return std::exp(x); }

// log that the host compiler can inline and vectorize: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), by its odd series to s^9 (|s| <= 0.172: relative
// error below 1e-8 before rounding). Subnormals are scaled first; log 0 = -inf, log inf = inf, a
// negative x or NaN gives NaN.
PYALIGN_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  const bool sub = x < 1.17549435e-38f;
  const uint32_t u = float_to_bits(sub ? x * 8388608.0f : x);  // 2^23
  int32_t e = int32_t((u >> 23) & 0xffu) - (sub ? 150 : 127);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 0.111111111f;
  p = p * s2 + 0.142857143f;
  p = p * s2 + 0.2f;
  p = p * s2 + 0.333333333f;
  p = p * s2 + 1.0f;
  const float ef = float(e);
  float y = ef * 0.693145752f + (2.0f * s * p + ef * 1.42860677e-6f);  // ln2 in a high and a low part
  y = x == 0.0f ? -INFINITY : y;
  y = x < 0.0f ? NAN : y;
  y = x == INFINITY ? INFINITY : y;
  return x != x ? x : y;
#endif
}
PYALIGN_HD double fast_log(double x) { return std::log(x); }

// tanh through fast_exp, exact sign and saturation; vectorizes like fast_exp. Below |x| = 0.25
// an odd Taylor polynomial (error < 1e-8 relative) avoids the cancellation in 1 - exp(-2|x|).
PYALIGN_HD float fast_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#endif
  float ax = x < 0 ? -x : x;
  float e = fast_exp(-2.0f * ax);
  float t = (1.0f - e) / (1.0f + e);
  t = x < 0 ? -t : t;
  float x2 = x * x;
  float small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * (-0.0539682540f + x2 * 0.0218694885f))));
  return ax < 0.25f ? small : t;
}
PYALIGN_HD double fast_tanh(double x) { return std::tanh(x); }

// sigmoid through one fast_exp of -|x| (no overflow); vectorizes like fast_exp.
template <typename A> PYALIGN_HD A fast_sigmoid(A x) {
  const A e = fast_exp(x < A(0) ? x : -x), r = A(1) / (A(1) + e);
  return x >= A(0) ? r : e * r;
}

// log1p(y), y >= -1, from one fast_log: log(u) + (y - (u - 1)) / u with u = 1 + y rounded; u - 1
// is exact and the second term restores what rounding 1 + y lost (within a few ulps of log1p,
// which glibc computes several times slower than log). NaN stays NaN, log1p(-1) = -inf.
PYALIGN_HD float fast_log1p(float y) {
#if defined(__CUDA_ARCH__)
  return log1pf(y);
#else
  const float u = 1.0f + y;
  const float c = (y - (u - 1.0f)) / u;
  return fast_log(u) + ((u > 0.0f) & (u < INFINITY) ? c : 0.0f);
#endif
}
PYALIGN_HD double fast_log1p(double y) { return std::log1p(y); }

// expm1 that vectorizes: below |x| = 0.5 its Taylor polynomial to x^8 (relative error < 1e-8, no
// cancellation), else fast_exp(x) - 1. NaN stays NaN; -inf gives -1, +inf gives +inf.
PYALIGN_HD float fast_expm1(float x) {
#if defined(__CUDA_ARCH__)
  return expm1f(x);
#else
  float p = 2.48015873e-5f;  // 1/8!
  p = p * x + 1.98412698e-4f;
  p = p * x + 1.38888889e-3f;
  p = p * x + 8.33333333e-3f;
  p = p * x + 4.16666667e-2f;
  p = p * x + 1.66666667e-1f;
  p = p * x + 0.5f;
  p = p * x + 1.0f;
  const float ax = x < 0.0f ? -x : x;
  return ax < 0.5f ? p * x : fast_exp(x) - 1.0f;
#endif
}
PYALIGN_HD double fast_expm1(double x) { return std::expm1(x); }

// log(1 + exp(x)) without overflow, vectorizable; log-sigmoid(x) = -softplus(-x).
template <typename A> PYALIGN_HD A softplus(A x) {
  return (x > A(0) ? x : A(0)) + fast_log1p(fast_exp(x < A(0) ? x : -x));
}
template <typename A> PYALIGN_HD A sigmoid(A x) { return fast_sigmoid(x); }
// log(1 - exp(x)) for x <= 0 (Maechler 2012).
template <typename A> PYALIGN_HD A log1mexp(A x) {
  return x > A(-0.6931471805599453) ? fast_log(-fast_expm1(x)) : fast_log1p(-fast_exp(x));
}

}  // namespace pyalign
