// A vector of W floats and the few operations miaotui's kernels need, for each CPU class the kernels are built for:
// AVX-512 (16 lanes), AVX2 + FMA + F16C (8 lanes), and portable C++ (8 lanes in plain loops that the compiler
// vectorizes for whatever the target has: SSE2, NEON, ...). The kernels are written once against this; the build
// flags (kernels/__init__.py, one build per CPU class) pick the implementation.
//
// Every implementation computes the same arithmetic in the same order per lane (e^x included), so the classes
// differ only where FMA contraction or the reduction order of a horizontal sum does.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define MIAOTUI_VEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MIAOTUI_VEC_AVX2 1
#endif

namespace mt {

using BF16 = c10::BFloat16;
using Half = c10::Half;

// e^x = 2^(x log2 e), split into 2^n and 2^f with f in [-0.5, 0.5] (its Taylor polynomial), to ~1 ulp.
constexpr float EXP_C[8] = {1.525273e-05f, 1.540353e-04f, 1.333356e-03f, 9.618129e-03f,
                            5.550411e-02f, 2.402265e-01f, 6.931472e-01f, 1.f};

inline uint16_t bf16_bits(float f) {  // round to nearest even, as torch's float -> bfloat16 (finite values)
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

#if MIAOTUI_VEC_AVX512
constexpr int W = 16;
struct Vec {
  __m512 v;
};
inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec set1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec load(const BF16* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
}
inline Vec load(const int8_t* p) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))}; }
inline Vec load(const Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline __m256i bf16_lanes(Vec a) {
  __m512i b = _mm512_castps_si512(a.v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}
inline void store(BF16* p, Vec a) { _mm256_storeu_si256((__m256i*)p, bf16_lanes(a)); }
inline void store_first(float* p, Vec a, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a.v); }
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec vmin(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec vabs(Vec a) { return {_mm512_abs_ps(a.v)}; }
inline Vec vround(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// Lanes holding whole numbers in [-128, 127] as W int8 values (the activation quantizer's codes).
inline void store_i8(int8_t* p, Vec a) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a.v))); }
inline void store_u8(uint8_t* p, Vec a) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a.v))); }
inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline Vec exp2i_mul(Vec p, Vec n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p * 2^n
// v[0..15] -> lane i is the sum of v[i]'s lanes (a transposing add tree: 45 instructions for 16 sums).
inline Vec hsum_lanes(const Vec* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v), _mm512_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return {_mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)))};
}
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

#elif MIAOTUI_VEC_AVX2
constexpr int W = 8;
struct Vec {
  __m256 v;
};
inline Vec zero() { return {_mm256_setzero_ps()}; }
inline Vec set1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec load(const BF16* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16))};
}
inline Vec load(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)))};
}
inline Vec load(const Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline __m128i bf16_lanes(Vec a) {
  __m256i b = _mm256_castps_si256(a.v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}
inline void store(BF16* p, Vec a) { _mm_storeu_si128((__m128i*)p, bf16_lanes(a)); }
inline void store_first(float* p, Vec a, int n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a.v);
  std::memcpy(p, t, n * sizeof(float));
}
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec vmin(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
inline Vec vabs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
inline Vec vround(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline __m128i lanes_i16(Vec a) {  // the 8 lanes (integer-valued) as int16, in order
  const __m256i i32 = _mm256_cvtps_epi32(a.v);
  return _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
}
inline void store_i8(int8_t* p, Vec a) {  // one 8-byte store: a later vector load of these bytes is forwarded
  const __m128i i16 = lanes_i16(a);
  _mm_storel_epi64((__m128i*)p, _mm_packs_epi16(i16, i16));
}
inline void store_u8(uint8_t* p, Vec a) {
  const __m128i i16 = lanes_i16(a);
  _mm_storel_epi64((__m128i*)p, _mm_packus_epi16(i16, i16));
}
inline float reduce_add(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(Vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline Vec exp2i_mul(Vec p, Vec n) {  // p * 2^n for integral n in [-127, 127]
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(e))};
}
// v[0..7] -> lane i is the sum of v[i]'s lanes.
inline Vec hsum_lanes(const Vec* v) {
  __m256 a = _mm256_hadd_ps(v[0].v, v[1].v), b = _mm256_hadd_ps(v[2].v, v[3].v);
  __m256 c = _mm256_hadd_ps(v[4].v, v[5].v), d = _mm256_hadd_ps(v[6].v, v[7].v);
  __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // [s0 s1 s2 s3 | s0 s1 s2 s3]' halves, per 128 bits
  __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
  return {_mm256_add_ps(lo, hi)};
}
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

#else  // portable C++: fixed-size loops the compiler vectorizes
constexpr int W = 8;
struct Vec {
  float v[W];
};
#define MT_LANES(expr)        \
  Vec r;                      \
  for (int i = 0; i < W; ++i) \
    r.v[i] = (expr);          \
  return r
inline Vec zero() { MT_LANES(0.f); }
inline Vec set1(float x) { MT_LANES(x); }
inline Vec load(const float* p) { MT_LANES(p[i]); }
inline Vec load(const BF16* p) { MT_LANES(static_cast<float>(p[i])); }
inline Vec load(const int8_t* p) { MT_LANES(static_cast<float>(p[i])); }
inline Vec load(const Half* p) { MT_LANES(static_cast<float>(p[i])); }
inline void store(float* p, Vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline void store(BF16* p, Vec a) {
  for (int i = 0; i < W; ++i) p[i] = BF16(bf16_bits(a.v[i]), BF16::from_bits());
}
inline void store_first(float* p, Vec a, int n) { std::memcpy(p, a.v, n * sizeof(float)); }
inline Vec operator+(Vec a, Vec b) { MT_LANES(a.v[i] + b.v[i]); }
inline Vec operator-(Vec a, Vec b) { MT_LANES(a.v[i] - b.v[i]); }
inline Vec operator*(Vec a, Vec b) { MT_LANES(a.v[i] * b.v[i]); }
inline Vec operator/(Vec a, Vec b) { MT_LANES(a.v[i] / b.v[i]); }
inline Vec fmadd(Vec a, Vec b, Vec c) { MT_LANES(std::fma(a.v[i], b.v[i], c.v[i])); }
inline Vec vmax(Vec a, Vec b) { MT_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline Vec vmin(Vec a, Vec b) { MT_LANES(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
inline Vec vabs(Vec a) { MT_LANES(std::fabs(a.v[i])); }
inline Vec vround(Vec a) { MT_LANES(std::nearbyint(a.v[i])); }
inline void store_i8(int8_t* p, Vec a) {
  for (int i = 0; i < W; ++i) p[i] = static_cast<int8_t>(a.v[i]);
}
inline void store_u8(uint8_t* p, Vec a) {
  for (int i = 0; i < W; ++i) p[i] = static_cast<uint8_t>(a.v[i]);
}
inline float reduce_add(Vec a) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += a.v[i];
  return s;
}
inline float reduce_max(Vec a) {
  float s = a.v[0];
  for (int i = 1; i < W; ++i) s = std::max(s, a.v[i]);
  return s;
}
inline Vec exp2i_mul(Vec p, Vec n) {
  Vec r;
  for (int i = 0; i < W; ++i) {
    const int32_t e = (static_cast<int32_t>(n.v[i]) + 127) << 23;
    float s;
    std::memcpy(&s, &e, 4);
    r.v[i] = p.v[i] * s;
  }
  return r;
}
inline Vec hsum_lanes(const Vec* v) { MT_LANES(reduce_add(v[i])); }
inline void prefetch_l2(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}
#undef MT_LANES
#endif

// Shared by every class: e^x, and x rounded to T's precision and back (a no-op for fp32).
inline Vec exp(Vec x) {
  x = vmax(vmin(x, set1(88.f)), set1(-88.f));
  const Vec t = x * set1(1.4426950408889634f);
  const Vec n = vround(t);
  const Vec f = t - n;
  Vec p = set1(EXP_C[0]);
  for (int i = 1; i < 8; ++i) p = fmadd(p, f, set1(EXP_C[i]));
  return exp2i_mul(p, n);
}

// In place over n scores: e^((s - max) * scale), every pass W lanes at a time (a scalar running maximum is a chain
// of dependent `vmaxss` that perf put at a fifth of the whole attention); returns the max and the sum, so that a
// span of a longer row merges with the others. (Returned by value: through reference outputs, the softmax built on
// it ran 14% slower on 256-wide heads.) A scale of 1 changes nothing: (s - max) * 1 is exact.
struct MaxSum {
  float max, sum;
};
inline MaxSum exp_scores(float* s, int64_t n, float scale = 1.f) {
  int64_t i = 0;
  Vec vmx = set1(-INFINITY);
  for (; i + W <= n; i += W) vmx = vmax(vmx, load(s + i));
  float mx = reduce_max(vmx);
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  Vec vsum = zero();
  const Vec vm = set1(mx), vs = set1(scale);
  for (i = 0; i + W <= n; i += W) {
    const Vec e = exp((load(s + i) - vm) * vs);
    store(s + i, e);
    vsum = vsum + e;
  }
  float sum = reduce_add(vsum);
  for (; i < n; ++i) sum += (s[i] = std::exp((s[i] - mx) * scale));
  return {mx, sum};
}

inline Vec round_to(const float*, Vec a) { return a; }
inline Vec round_to(const BF16*, Vec a) {
  alignas(64) BF16 t[W];
  store(t, a);
  return load(t);
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }
template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }  // bf16: round to nearest even

}  // namespace mt
