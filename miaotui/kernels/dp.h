// bf16 products on `vdpbf16ps` (AVX512-BF16), shared by the prefill-sized products of qmatmul.cpp and the prefill
// attention of attention.cpp: a tile of dp::ROWS rows (x) against two strips of 16 outputs (w), the inputs in pairs.
// Compiled into the AVX-512 builds for these functions only (a target region) and taken after `bf16_units()`, so
// those builds still run on AVX-512 CPUs without the units.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MIAOTUI_DP 1
#else
#define MIAOTUI_DP 0
#endif

#if MIAOTUI_DP
namespace dp {

// `vdpbf16ps`, and VBMI's `vpermb` for widening codes to it: Zen 4/5 (Cooper Lake has the first alone).
inline bool bf16_units() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

// Rows per pass: 2 * 14 accumulators, two weight lines and a broadcast take 31 of the 32 registers.
constexpr int ROWS = 14;

// The functions between MIAOTUI_BF16_BEGIN and MIAOTUI_BF16_END are compiled for the bf16 units (and VBMI), the rest
// of the file for its build's class.
#if defined(__clang__)
#define MIAOTUI_BF16_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx512bf16,avx512vbmi\"))), apply_to = function)")
#define MIAOTUI_BF16_END _Pragma("clang attribute pop")
#else
#define MIAOTUI_BF16_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512bf16,avx512vbmi\")")
#define MIAOTUI_BF16_END _Pragma("GCC pop_options")
#endif

MIAOTUI_BF16_BEGIN

// `rows` (<= ROWS) rows of x (bf16, K inputs, row stride `stride`) as `tile` reads them: each pair of inputs of the
// rows side by side ([K / 2][ROWS] 32-bit pairs), so every broadcast is at a fixed offset from one pointer; rows past
// `rows` zero.
inline void pack_tile(const at::BFloat16* x, int64_t stride, int64_t rows, int64_t K, int32_t* out) {
  for (int r = 0; r < ROWS; ++r) {
    const int32_t* xr = reinterpret_cast<const int32_t*>(x + r * stride);
    if (r < rows)
      for (int64_t j = 0; j < K / 2; ++j) out[j * ROWS + r] = xr[j];
    else
      for (int64_t j = 0; j < K / 2; ++j) out[j * ROWS + r] = 0;
  }
}

// A packed tile of rows times a strip pair (w0, w1: 64-byte line j holds inputs 2j and 2j+1 of the strip's 16
// outputs, lines 64-byte aligned): each line meets every row's pair, broadcast, in one `vdpbf16ps` (16 outputs x 2
// inputs), 28 accumulators side by side. The tile's first `rows` rows of y (row stride N) get outputs n0 .. n0 + cols
// (T: fp32, or bf16 rounded to nearest even).
template <typename T>
inline void tile(const int32_t* xt, int64_t K, const at::BFloat16* w0, const at::BFloat16* w1, T* y, int64_t rows,
                 int64_t N, int64_t n0, int64_t cols) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __m512i* l0 = reinterpret_cast<const __m512i*>(w0);
  const __m512i* l1 = reinterpret_cast<const __m512i*>(w1);
  for (int64_t j = 0; j < K / 2; ++j, xt += ROWS) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(l0 + j), b1 = (__m512bh)_mm512_load_si512(l1 + j);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(xt[r]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int s = 0; s < 2 && 16 * s < cols; ++s) {
      const int n = static_cast<int>(std::min<int64_t>(16, cols - 16 * s));
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      T* out = y + r * N + n0 + 16 * s;
      if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(out, mask, acc[r][s]);
      else _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(acc[r][s]));
    }
}

MIAOTUI_BF16_END

}  // namespace dp
#endif
