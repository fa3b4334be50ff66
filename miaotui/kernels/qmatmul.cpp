// Low-bit weight x activation products on integer dot-product units (AVX-512 VNNI): the activations are quantized
// to int8 in blocks of 32, as llama.cpp does, plus a second int8 term for the rounding residual, and each 4-byte
// group of weight codes meets 4 activation bytes in one `vpdpbusd`.
//
// Weights are unsigned codes with an affine map per (row, group): w = d * q + m, where q is 4-bit (0..15; GGUF
// Q4_1 stores exactly this) or 8-bit (0..255: a symmetric int8 weight w = s * c is q = c + 128, d = s, m = -128 s).
// With activations x ~ dx * xq (two int8 terms, see QuantX), a group's contribution is d * Σ_blocks dx * Σ q xq
// + m * Σ dx xq: the integer sums run on VNNI, the second term needs only the sum of the (rounded) activations.
//
// Layout (packed once in Python, miaotui/quant/packed.py): rows in blocks of 16, one 64-byte line per
// (row block, input chunk) holding 16 rows x 4 bytes, so one vector load feeds one `vpdpbusd` for 16 outputs.
//   4-bit: chunks of 8 inputs; byte 4r+j holds input j in its low nibble and input j+4 in its high nibble.
//   8-bit: chunks of 4 inputs; byte 4r+j holds input j.
// Scales: fp16 [row blocks, groups, 2, 16] (d then m for 16 rows), exact for GGUF's fp16 block scales.
//   6-bit (GGUF Q6_K exactly, VNNI and AVX2 builds): w = D * s * (q - 32), q 0..63, an int8 s per 16 inputs and an
//   fp16 D per 256. Per 16 inputs three lines: two of nibbles as in the 4-bit layout (line 0: inputs 0-3 low, 4-7 high;
//   line 1: 8-11, 12-15), then one of high bits (byte 4r+j, bits 2p..2p+1: the high two bits of input 4p+j). Its
//   scales: bytes [row blocks, K/256, 288], per super-block D of the 16 rows (fp16) then s [16 groups][16 rows].
//   Unpacked, its three lines are four lines of the 8-bit layout (unpack6): 6.56 bits a weight where Q6_K held as
//   8-bit codes takes 9 (and those were requantized).
//   4-bit with K-quant scales (GGUF Q4_K exactly, every build; `KS` in the kernels): w = D * sc * q - Dmin * mn, a
//   6-bit sc and mn per 32 inputs under an fp16 D and Dmin per 256. Scales: bytes [row blocks, K/256, 320], per
//   super-block D of the 16 rows (fp16), then -Dmin, then sc [8 groups][16 rows] and mn (a byte each): 4.63 bits a
//   weight where fp16 d and m per 32 take 5 (and round D * sc to fp16).
//
// From 8 rows of bf16 activations on (prefill, batched decode), where the CPU has AMX, the same layout is widened to
// bf16 instead and multiplied on the tile unit (see "Many rows" below).
//
// Each CPU class has its integer kernel for the same layout and the same integer sums: AVX-512 VNNI (`vpdpbusd`:
// 4 byte products summed per 32-bit lane), AVX2 (4-bit codes: `vpmaddubsw` + `vpmaddwd`, the same sums in two
// steps; 8-bit and 6-bit codes, and 4-bit ones from 8 rows on: widened to int16 and multiplied by both activation
// terms at once in `vpmaddwd`), and portable C++ (plain integer loops). Prompt-sized products without VNNI, and on
// AVX-512 CPUs without BF16 units those of 4/8-bit codes in groups other than 32, are taken in fp32 (see
// dense_min_rows).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dp.h"
#include "ops.h"
#include "vec.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MIAOTUI_VNNI 1
#else
#define MIAOTUI_VNNI 0
#endif
#if !MIAOTUI_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MIAOTUI_AVX2 1
#else
#define MIAOTUI_AVX2 0
#endif
#if MIAOTUI_VNNI
#include <cpuid.h>
#endif
#if MIAOTUI_VNNI && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512VBMI__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define MIAOTUI_AMX 1
#else
#define MIAOTUI_AMX 0
#endif

using at::Tensor;

namespace {

constexpr int64_t QBLOCK = 32;  // activation quantization block
// Weights stream from memory once per token: the hardware prefetcher alone kept this loop at ~13 GB/s here (a
// plain sum reads 44 GB/s), so each line also asks for the one this many bytes ahead. The VNNI kernel asks for it
// into L2: into L1 the requests filled the core's miss buffers on a Zen 4 (SmolLM2's 8-bit head streamed at 18-20
// GB/s against a plain read's 30-37, into L2 at 25-28; the decode stack 5% faster). The AVX2 kernels keep L1: their
// build showed no difference on that Zen 4, and an AVX2-only host was not there to measure. The VNNI kernels ask
// from further ahead: at 8 KB a Qwen2.5-1.5B step of 4 rows ran 1.05-1.09x faster than at 2 KB, 1 and 9 rows level
// (Zen 4, two builds alternated in one engine at 500 tokens of context, 14-40 pairs; its 6-bit products' 1-row step
// 1.03-1.04x against 4 KB, 1.07x at 4 rows against 2 KB). Only for weights whose row blocks span that much: at 8 KB
// for all, SmolLM2's 4-row step (row blocks of 4.5 KB) ran 0.98x, capped at one row block no better; keeping 2 KB
// for such small rows made it 1.04x faster again (two runs, 20-24 pairs; Qwen's steps level).
constexpr int64_t PREFETCH = 2048;
constexpr int64_t PREFETCH_VNNI = 4 * PREFETCH;

// n Ts left as they are: quantize_rows writes every one (a std::vector zeroed them first, ~1-2% of a batched decode
// step in memset).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  explicit Scratch(int64_t n) : p(new T[n]) {}
  T* data() const { return p.get(); }
  T& operator[](int64_t i) const { return p[i]; }
};

// Activations quantized in two int8 terms, x = d * q + (d / 256) * r: q rounds x at the block's scale and r rounds
// what is left (at most half a step) at a 256x finer one, so x keeps ~15 bits and the products stay on VNNI. With
// one term (llama.cpp's Q8 activations; `act_bits` 8, r all zero and its products skipped) an outlier coarsens its
// whole block: perplexity +0.6% on SmolLM2, +0.14% on Qwen2.5-Coder-1.5B (fp32), greedy text drifts from the
// reference's; the product of 4 rows or more takes ~0.63 of the time (Zen 4, weights in L3), a 2-9-row step of Qwen
// 0.8-0.85.
// gsum: per weight group, the sum of x as rounded (d * (q + r / 256)), for the m term (groups of 16 for 6-bit codes:
// per half block). Rounded, not exact: then the product is the rounded x times the weights w = d q + m exactly, and
// the rounding's error meets w, centred on zero; with x's exact sum it met d q alone, codes on one side of zero, and
// one term cost 3x the perplexity (SmolLM2 +2.9% against +0.6% now in fp32, Gemma 3 270M +1.7% against +0.2% in
// bf16; at two terms 0.001% or less).
struct QuantX {
  Scratch<int8_t> q;
  Scratch<int8_t> r;
  Scratch<float> d;
  Scratch<float> gsum;
  std::vector<int16_t> a;  // q * 256 + r as one int16 (|a| <= 32639), for the AVX2 kernels on `vpmaddwd`
  bool residual = true;  // false: one term, r is zero and the kernels skip its products
};
constexpr float RESIDUAL = 256.f;  // a power of two: the two integer sums combine by a shift

// A row block's scales in halves (fp16 d and m per group; 6-bit: 288 bytes per super-block of 256 inputs; K-quant
// scales: 320).
inline int64_t scale_halves(int64_t bits, int64_t K, int64_t group, bool ks = false) {
  return bits == 6 ? K / 256 * 144 : ks ? K / 256 * 160 : K / group * 32;
}
// A layout's scales as the kernels take them (6-bit: its bytes, read through their own accessors).
inline const at::Half* scales_of(const Tensor& dm) { return static_cast<const at::Half*>(dm.const_data_ptr()); }

// in_scale (S: fp32 or bf16, as the weight stores it) multiplies x first, when given. W lanes at a time; each class
// rounds the same way, so the codes are the same on every CPU.
template <typename T, typename S>
void quantize_rows(const T* x, const S* in_scale, int64_t M, int64_t K, int64_t group, int8_t* q, int8_t* r,
                   float* d, float* gsum, bool residual, int16_t* a = nullptr) {
  const int64_t nb = K / QBLOCK, gb = std::max<int64_t>(1, group / QBLOCK), ngroups = K / group;
  constexpr int NV = QBLOCK / mt::W;
  static_assert(NV % 2 == 0, "a block's halves in whole vectors");
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const T* xb = x + m * K + b * QBLOCK;
        if (b % gb == 0 && group >= QBLOCK) gsum[m * ngroups + b / gb] = 0.f;
        mt::Vec v[NV];
        mt::Vec vmax = mt::zero();
        for (int h = 0; h < NV; ++h) {
          v[h] = mt::load(xb + mt::W * h);
          if (in_scale) v[h] = v[h] * mt::load(in_scale + b * QBLOCK + mt::W * h);
          vmax = mt::vmax(vmax, mt::vabs(v[h]));
        }
        const float amax = mt::reduce_max(vmax);
        const mt::Vec inv = mt::set1(amax > 0.f ? 127.f / amax : 0.f);
        for (int h = 0; h < NV; ++h) {
          const mt::Vec t = v[h] * inv;
          const mt::Vec c = mt::vround(t);
          const mt::Vec res = residual ? mt::vmax(mt::vmin(mt::vround((t - c) * mt::set1(RESIDUAL)), mt::set1(127.f)),
                                                  mt::set1(-127.f))
                                       : mt::zero();
          mt::store_i8(q + m * K + b * QBLOCK + mt::W * h, c);
          mt::store_i8(r + m * K + b * QBLOCK + mt::W * h, res);
          v[h] = c + res * mt::set1(1.f / RESIDUAL);  // the value the products see, in steps of d
        }
        d[m * nb + b] = amax / 127.f;
        if (a)  // both terms as one int16, 256 q + r, for the AVX2 kernels that multiply in `vpmaddwd`
          for (int64_t j = m * K + b * QBLOCK; j < m * K + (b + 1) * QBLOCK; ++j)
            a[j] = static_cast<int16_t>(q[j] * 256 + r[j]);
        if (group >= QBLOCK) {
          mt::Vec bs = mt::zero();
          for (int h = 0; h < NV; ++h) bs = bs + v[h];
          gsum[m * ngroups + b / gb] += d[m * nb + b] * mt::reduce_add(bs);
        } else {  // groups of 16: each half of the block
          for (int half = 0; half < 2; ++half) {
            mt::Vec hs = mt::zero();
            for (int h = half * NV / 2; h < (half + 1) * NV / 2; ++h) hs = hs + v[h];
            gsum[m * ngroups + 2 * b + half] = d[m * nb + b] * mt::reduce_add(hs);
          }
        }
      }
    }
  });
}

template <typename T>
inline void store_row(T* y, int64_t n, const float* v) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(v[i]);
}

#if MIAOTUI_VNNI
// acc += the 4-byte dot products of u8 (unsigned codes) with the 4 signed bytes at s8, broadcast from memory inside
// the instruction: GCC keeps `_mm512_set1_epi32(*s8)` as a separate broadcast, one more instruction per product.
inline __m512i dpbusd_bcast(__m512i acc, __m512i u8, const int32_t* s8) {
#if defined(__GNUC__)
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*s8));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u8, _mm512_set1_epi32(*s8));
#endif
}

// An activation word broadcast into a register of its own, for products that share it: left to itself GCC folds
// `_mm512_set1_epi32(*p)` into every product as a memory operand, one broadcast load a product again.
inline __m512i bcast_reg(const int32_t* p) {
  __m512i v = _mm512_set1_epi32(*p);
  asm("" : "+v"(v));
  return v;
}

// The 6-bit layout's three lines of 16 inputs (at w) as four lines of the 8-bit layout: v[p] holds inputs
// 4p..4p+3 of the 16 rows, codes 0..63 (a nibble plane with its high bits moved to bits 4-5).
inline void unpack6(const uint8_t* w, __m512i v[4]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), high2 = _mm512_set1_epi8(0x30);
  const __m512i l0 = _mm512_loadu_si512(w), l1 = _mm512_loadu_si512(w + 64), hi = _mm512_loadu_si512(w + 128);
  // (a & b) | c: the nibble under its mask, or'ed with its two high bits already in place
  v[0] = _mm512_ternarylogic_epi32(low4, l0, _mm512_and_si512(_mm512_slli_epi16(hi, 4), high2), 0xEA);
  v[1] = _mm512_ternarylogic_epi32(low4, _mm512_srli_epi16(l0, 4), _mm512_and_si512(_mm512_slli_epi16(hi, 2), high2),
                                   0xEA);
  v[2] = _mm512_ternarylogic_epi32(low4, l1, _mm512_and_si512(hi, high2), 0xEA);
  v[3] = _mm512_ternarylogic_epi32(low4, _mm512_srli_epi16(l1, 4), _mm512_and_si512(_mm512_srli_epi16(hi, 2), high2),
                                   0xEA);
}

// 16 rows' fp16 values stored at p (the byte scale layouts' D and -Dmin).
inline __m512 halves16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A 6-bit super-block's scales `sb`: the 16 rows' s of group hh (0..15) as floats (D * s is exact in fp32: 11 x 8
// bits).
inline __m512 scales6_s(const uint8_t* sb, int64_t hh) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 32 + 16 * hh))));
}
inline __m512 scales6(const uint8_t* sb, int64_t hh) { return _mm512_mul_ps(halves16(sb), scales6_s(sb, hh)); }

// Group g's d and m of 16 rows: fp16 as stored, or (KS) from Q4_K's bytes, D * sc and -Dmin * mn (exact in fp32).
template <bool KS>
inline void group_scales(const at::Half* dm, int64_t g, __m512& dv, __m512& mv) {
  if constexpr (KS) {
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(dm) + g / 8 * 320;
    auto bytes = [&](int64_t off) {
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + off))));
    };
    dv = _mm512_mul_ps(halves16(sb), bytes(64 + g % 8 * 16));
    mv = _mm512_mul_ps(halves16(sb + 32), bytes(192 + g % 8 * 16));
  } else {
    dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + g * 32)));
    mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + g * 32 + 16)));
  }
}

// Group g's d and m as the block kernels multiply them: d carries the 1/256 of the two terms' shift-joined sum.
template <bool Residual, bool KS>
inline void joined_scales(const at::Half* dm, int64_t g, __m512& dv, __m512& mv) {
  group_scales<KS>(dm, g, dv, mv);
  if constexpr (Residual) dv = _mm512_mul_ps(dv, _mm512_set1_ps(1.f / RESIDUAL));
}

// One block of 16 output rows for MT tokens over 6-bit codes: per 16 inputs, three lines unpacked once for all MT
// tokens, 4 products a term and token, then the group's scale: y += D s (xd Σ q x' - 32 Σ x) (x' the activation
// codes, two terms as 256 q + r; the 1/256 in D s). Its conversions come per 16 inputs where the 8-bit kernel's
// come per 32, for 3/4 of the bytes; gs holds the activations' sums per 16.
// Unpacked: w holds the block already unpacked (four 8-bit lines per 16 inputs, as `keep` receives them when given);
// pf: where to prefetch from, 192 bytes a group of 16 inputs (the lines themselves ahead, or the next row block).
template <int MT, bool Residual, bool Unpacked, typename T>
inline void qgemm6_block(const uint8_t* w, const uint8_t* sc, const int8_t* xq, const int8_t* xr, const float* xd,
                         const float* gs, int64_t K, T* y, int64_t ldy, int64_t rows, const char* pf,
                         uint8_t* keep) {
  const int64_t nh = K / 16, nb = K / QBLOCK;
  constexpr int NA = MT * (Residual ? 2 : 1) >= 3 ? 1 : 2;  // as in qgemm_block
  const __m512 unit = _mm512_set1_ps(Residual ? 1.f / RESIDUAL : 1.f);
  const float mterm = Residual ? -32.f * RESIDUAL : -32.f;
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < K / 256; ++sb, sc += 288) {
    const __m512 d = _mm512_mul_ps(halves16(sc), unit);
    for (int64_t hh = 0; hh < 16; ++hh, pf += 192) {
      const int64_t h = sb * 16 + hh, b = h / 2;
      __m512i v[4];
      if constexpr (Unpacked) {
        for (int p = 0; p < 4; ++p) v[p] = _mm512_loadu_si512(w + 64 * p);
        w += 256;
      } else {
        unpack6(w, v);
        w += 192;
        if (keep) {
          for (int p = 0; p < 4; ++p) _mm512_storeu_si512(keep + 64 * p, v[p]);
          keep += 256;
        }
      }
      for (int l = 0; l < 3; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T1);
      const __m512 ds = _mm512_mul_ps(d, scales6_s(sc, hh));
      for (int t = 0; t < MT; ++t) {
        __m512i qs[NA], rs[NA];
        for (int a = 0; a < NA; ++a) qs[a] = rs[a] = _mm512_setzero_si512();
        const int32_t* xp = reinterpret_cast<const int32_t*>(xq + t * K + h * 16);
        const int32_t* rp = reinterpret_cast<const int32_t*>(xr + t * K + h * 16);
        for (int i = 0; i < 4; ++i) {
          qs[i % NA] = dpbusd_bcast(qs[i % NA], v[i], xp + i);
          if constexpr (Residual) rs[i % NA] = dpbusd_bcast(rs[i % NA], v[i], rp + i);
        }
        __m512i q = qs[0], r = rs[0];
        if constexpr (NA == 2) {
          q = _mm512_add_epi32(q, qs[1]);
          r = _mm512_add_epi32(r, rs[1]);
        }
        const __m512i sum = Residual ? _mm512_add_epi32(_mm512_slli_epi32(q, 8), r) : q;
        const __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xd[t * nb + b]),
                                            _mm512_set1_ps(mterm * gs[t * nh + h]));
        acc[t] = _mm512_fmadd_ps(part, ds, acc[t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    alignas(64) float out[16];
    _mm512_store_ps(out, acc[t]);
    store_row(y + t * ldy, rows, out);
  }
}

// Two 6-bit row blocks (w[0], w[1]) for MT tokens, each activation broadcast feeding both blocks' products (see
// qgemm_block2), the sums and roundings of qgemm6_block's row by row. Unpacked, keep: as there, per block; a null
// pf[r] asks for nothing. Per 16 inputs the tokens' sums are taken line by line across all tokens (2 MT independent
// chains in flight), and from 3 tokens on the second term's products go on from the first's sum shifted into
// place (the same integers as adding them after): against each token's four products a term in turn,
// Qwen2.5-1.5B's 6-bit rows at 7-16 tokens ran 1.03-1.12x faster (Zen 5, the rows held in cache and streamed;
// 31 alternations in one process).
template <int MT, bool Residual, bool Unpacked, typename T>
inline void qgemm6_block2(const uint8_t* const* w_, const uint8_t* const* sc_, const int8_t* xq, const int8_t* xr,
                          const float* xd, const float* gs, int64_t K, T* y, int64_t ldy, int64_t rows1,
                          const char* const* pf_, uint8_t* const* keep_) {
  const int64_t nh = K / 16, nb = K / QBLOCK;
  const __m512 unit = _mm512_set1_ps(Residual ? 1.f / RESIDUAL : 1.f);
  const float mterm = Residual ? -32.f * RESIDUAL : -32.f;
  const uint8_t* w[2] = {w_[0], w_[1]};
  const uint8_t* sc[2] = {sc_[0], sc_[1]};
  const char* pf[2] = {pf_[0], pf_[1]};
  uint8_t* keep[2] = {keep_ ? keep_[0] : nullptr, keep_ ? keep_[1] : nullptr};
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    __m512 d[2];
    for (int r = 0; r < 2; ++r) d[r] = _mm512_mul_ps(halves16(sc[r]), unit);
    for (int64_t hh = 0; hh < 16; ++hh) {
      const int64_t h = sb * 16 + hh, b = h / 2;
      __m512i v[2][4];
      __m512 ds[2];
      for (int r = 0; r < 2; ++r) {
        if constexpr (Unpacked) {
          for (int p = 0; p < 4; ++p) v[r][p] = _mm512_loadu_si512(w[r] + 64 * p);
          w[r] += 256;
        } else {
          unpack6(w[r], v[r]);
          w[r] += 192;
          if (keep[r]) {
            for (int p = 0; p < 4; ++p) _mm512_storeu_si512(keep[r] + 64 * p, v[r][p]);
            keep[r] += 256;
          }
        }
        if (pf[r]) {
          for (int l = 0; l < 3; ++l) _mm_prefetch(pf[r] + 64 * l, _MM_HINT_T1);
          pf[r] += 192;
        }
        ds[r] = _mm512_mul_ps(d[r], scales6_s(sc[r], hh));
      }
      __m512i ss[MT][2];
      for (int t = 0; t < MT; ++t) ss[t][0] = ss[t][1] = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i)
        for (int t = 0; t < MT; ++t) {
          const __m512i bq = bcast_reg(reinterpret_cast<const int32_t*>(xq + t * K + h * 16) + i);
          ss[t][0] = _mm512_dpbusd_epi32(ss[t][0], v[0][i], bq);
          ss[t][1] = _mm512_dpbusd_epi32(ss[t][1], v[1][i], bq);
        }
      if constexpr (Residual) {
        // From 3 tokens on (6 chains or more) the second term goes on from the first's sum; fewer take it apart
        // and add the two after, as more chains of half the length (a token's decode step on AMX builds).
        constexpr bool chained = MT >= 3;
        __m512i rs[MT][2];
        for (int t = 0; t < MT; ++t)
          for (int r = 0; r < 2; ++r) rs[t][r] = chained ? _mm512_slli_epi32(ss[t][r], 8) : _mm512_setzero_si512();
        for (int i = 0; i < 4; ++i)
          for (int t = 0; t < MT; ++t) {
            const __m512i br = bcast_reg(reinterpret_cast<const int32_t*>(xr + t * K + h * 16) + i);
            rs[t][0] = _mm512_dpbusd_epi32(rs[t][0], v[0][i], br);
            rs[t][1] = _mm512_dpbusd_epi32(rs[t][1], v[1][i], br);
          }
        for (int t = 0; t < MT; ++t)
          for (int r = 0; r < 2; ++r)
            ss[t][r] = chained ? rs[t][r] : _mm512_add_epi32(_mm512_slli_epi32(ss[t][r], 8), rs[t][r]);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 xdt = _mm512_set1_ps(xd[t * nb + b]), mt = _mm512_set1_ps(mterm * gs[t * nh + h]);
        for (int r = 0; r < 2; ++r) {
          const __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ss[t][r]), xdt, mt);
          acc[t][r] = _mm512_fmadd_ps(part, ds[r], acc[t][r]);
        }
      }
    }
    sc[0] += 288;
    sc[1] += 288;
  }
  for (int t = 0; t < MT; ++t) {
    alignas(64) float out[32];
    _mm512_store_ps(out, acc[t][0]);
    _mm512_store_ps(out + 16, acc[t][1]);
    store_row(y + t * ldy, 16 + rows1, out);
  }
}

// One block of 16 output rows for one token (a decode step's products): the scheduling of the products before
// the many-token kernel below (two accumulators a term, broadcasts as separate loads, the 1/256 in the block
// scale). That kernel's one-token instance computes the same sums, but GCC orders its loads later: a Qwen2.5-1.5B
// decode step ran 2-4% slower with it (Zen 4, one engine alternated; its 8-bit lines loaded just in time where
// this kernel's are loaded ahead of the products). The line loads stay written out here, not shared with
// qgemm_block: through a shared inline helper GCC scheduled the 8-bit loads late again (read from the assembly).
template <int Bits, bool Residual, bool KS, typename T>
inline void qgemm_token(const uint8_t* w, const at::Half* dm, const int8_t* xq, const int8_t* xr, const float* xd,
                        const float* gs, int64_t K, int64_t group, T* y, int64_t rows, int64_t ahead) {
  const int64_t ngroups = K / group, blocks_per_group = group / QBLOCK;
  constexpr int chunks = Bits == 4 ? 4 : 8;  // 64-byte lines per block of 32 inputs
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512 fd = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      __m512i qs[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, rs[2] = {qs[0], qs[1]};
      for (int c = 0; c < chunks; c += 2) {
        __m512i v[4];  // as in qgemm_block
        if (Bits == 4) {
          for (int h = 0; h < 2; ++h) {
            const __m512i line = _mm512_loadu_si512(w + 64 * h);
            v[2 * h] = _mm512_and_si512(line, low4);
            v[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(line, 4), low4);
          }
        } else {
          v[0] = _mm512_loadu_si512(w);
          v[1] = _mm512_loadu_si512(w + 64);
        }
        _mm_prefetch(reinterpret_cast<const char*>(w) + ahead, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w) + ahead + 64, _MM_HINT_T1);
        w += 128;
        const int64_t off = b * QBLOCK + c * (Bits == 4 ? 8 : 4);
        const int32_t* xp = reinterpret_cast<const int32_t*>(xq + off);
        const int32_t* rp = reinterpret_cast<const int32_t*>(xr + off);
        for (int i = 0; i < (Bits == 4 ? 4 : 2); ++i) {
          qs[i & 1] = _mm512_dpbusd_epi32(qs[i & 1], v[i], _mm512_set1_epi32(xp[i]));
          if constexpr (Residual) rs[i & 1] = _mm512_dpbusd_epi32(rs[i & 1], v[i], _mm512_set1_epi32(rp[i]));
        }
      }
      const __m512i q = _mm512_add_epi32(qs[0], qs[1]), r = _mm512_add_epi32(rs[0], rs[1]);
      const __m512i both = Residual ? _mm512_add_epi32(_mm512_slli_epi32(q, 8), r) : _mm512_slli_epi32(q, 8);
      fd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(both), _mm512_set1_ps(xd[b] / RESIDUAL), fd);
    }
    __m512 dv, mv;
    group_scales<KS>(dm, g, dv, mv);
    acc = _mm512_fmadd_ps(fd, dv, acc);
    acc = _mm512_fmadd_ps(mv, _mm512_set1_ps(gs[g]), acc);
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, acc);
  store_row(y, rows, out);
}

// One block of 16 output rows for MT tokens: every weight line is loaded (and unpacked) once for all MT tokens.
// Residual: the activations' second term (false: one term, its products skipped). Per block of 32 inputs and token
// there are 8 products a term; what turns their integer sums into floats is kept to a shift and an add (two
// terms), a conversion and one multiply-add, the factor 1/256 of the two terms' sum going into the group's scale
// (a power of two: the same roundings, the same results). With the broadcasts inside the products, 2-8% faster
// at 4-9 rows with the weights in L3 (Qwen2.5-1.5B's gate|up and down, Zen 4).
template <int Bits, int MT, bool Residual, bool KS, typename T>
inline void qgemm_block(const uint8_t* w, const at::Half* dm, const int8_t* xq, const int8_t* xr, const float* xd,
                        const float* gs, int64_t K, int64_t group, T* y, int64_t ldy, int64_t rows,
                        int64_t ahead) {
  if constexpr (MT == 1) {
    qgemm_token<Bits, Residual, KS>(w, dm, xq, xr, xd, gs, K, group, y, rows, ahead);
    return;
  }
  const int64_t ngroups = K / group, blocks_per_group = group / QBLOCK, nb = K / QBLOCK;
  constexpr int chunks = Bits == 4 ? 4 : 8;  // 64-byte lines per block of 32 inputs
  // Accumulators per token and term: one from 3 token-terms on, the other tokens' products filling its latency
  // (two each for 4 tokens at one term measured 2-8% slower on a Zen 4); two below that.
  constexpr int NA = MT * (Residual ? 2 : 1) >= 3 ? 1 : 2;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512 fd[MT];
    for (int t = 0; t < MT; ++t) fd[t] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      __m512i qs[MT][NA], rs[MT][NA];
      for (int t = 0; t < MT; ++t)
        for (int a = 0; a < NA; ++a) qs[t][a] = rs[t][a] = _mm512_setzero_si512();
      // Two lines a pass, so that every accumulator index is a constant and the accumulators stay in registers
      // (indexed by a line's parity, the 8-bit ones lived on the stack: 3x slower from 4 tokens on).
      for (int c = 0; c < chunks; c += 2) {
        __m512i v[4];  // 4-bit: both lines' low and high nibble planes; 8-bit: the two lines
        if (Bits == 4) {
          for (int h = 0; h < 2; ++h) {
            const __m512i line = _mm512_loadu_si512(w + 64 * h);
            v[2 * h] = _mm512_and_si512(line, low4);
            v[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(line, 4), low4);
          }
        } else {
          v[0] = _mm512_loadu_si512(w);
          v[1] = _mm512_loadu_si512(w + 64);
        }
        _mm_prefetch(reinterpret_cast<const char*>(w) + ahead, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w) + ahead + 64, _MM_HINT_T1);
        w += 128;
        // 4-bit: line c's bytes hold inputs 8c..8c+3 (low nibbles) and 8c+4..8c+7 (high); 8-bit: 4c..4c+3
        constexpr int ops = Bits == 4 ? 4 : 2;
        for (int t = 0; t < MT; ++t) {
          const int64_t off = t * K + b * QBLOCK + c * (Bits == 4 ? 8 : 4);
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + off);
          const int32_t* rp = reinterpret_cast<const int32_t*>(xr + off);
          for (int i = 0; i < ops; ++i) {
            qs[t][i % NA] = dpbusd_bcast(qs[t][i % NA], v[i], xp + i);
            if constexpr (Residual) rs[t][i % NA] = dpbusd_bcast(rs[t][i % NA], v[i], rp + i);
          }
        }
      }
      for (int t = 0; t < MT; ++t) {  // q * 256 + r fits int32: |Σ| <= 32 * 255 * 127 * 257
        __m512i q = qs[t][0], r = rs[t][0];
        if constexpr (NA == 2) {
          q = _mm512_add_epi32(q, qs[t][1]);
          r = _mm512_add_epi32(r, rs[t][1]);
        }
        const __m512i sum = Residual ? _mm512_add_epi32(_mm512_slli_epi32(q, 8), r) : q;
        fd[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xd[t * nb + b]), fd[t]);
      }
    }
    __m512 dv, mv;
    joined_scales<Residual, KS>(dm, g, dv, mv);
    for (int t = 0; t < MT; ++t) {
      acc[t] = _mm512_fmadd_ps(fd[t], dv, acc[t]);
      acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(gs[t * ngroups + g]), acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    alignas(64) float out[16];
    _mm512_store_ps(out, acc[t]);
    store_row(y + t * ldy, rows, out);
  }
}

// A pair of row blocks' scales for qgemm_block2's passes over many tokens, made once: per block b, at out + 64 b,
// each row block's 16 d and then its 16 m. Read back, they take the loads' ports, not the two vector ports that
// the products share with the conversions: a block's scales cost ~20 vector operations a pass against its 128
// products at 4 tokens and two terms (Ice Lake Xeon, one thread, alternated processes, min of 6: Q4_K rows 1536 x
// 8960 at 64 and 512 tokens 1.06x and 1.08x; Qwen2.5-Coder-1.5B's 512-token prompt, medians of 15, 78 -> 91
// tok/s). One pass (2-4 tokens) converts them in the kernel: made ahead, they ran 3-4% slower there.
template <bool Residual, bool KS>
inline void pair_scales(const at::Half* dm0, const at::Half* dm1, int64_t nb, float* out) {
  const at::Half* dm[2] = {dm0, dm1};
  for (int64_t b = 0; b < nb; ++b)
    for (int r = 0; r < 2; ++r) {
      __m512 dv, mv;
      joined_scales<Residual, KS>(dm[r], b, dv, mv);
      _mm512_storeu_ps(out + 64 * b + 32 * r, dv);
      _mm512_storeu_ps(out + 64 * b + 32 * r + 16, mv);
    }
}

// Two blocks of 16 output rows (w0, w1; one group a block of 32 inputs) for MT tokens: each activation broadcast
// feeds two products, one a row block. An Ice Lake Xeon (family 6 model 106) retires two register `vpdpbusd` a
// cycle but only ~1.15 when each product takes a broadcast of its own (from memory or its own load; measured in a
// loop of 12 independent products: 5.2 against 3.0 G a second), so qgemm_block, one broadcast a product, reached
// half the products' rate there. The sums are those of qgemm_block, in the same order: a row's result is the same.
// Made: the blocks' scales are read from `scales` (pair_scales), not converted from dm0 and dm1 here.
template <int Bits, int MT, bool Residual, bool KS, bool Made, typename T>
inline void qgemm_block2(const uint8_t* w0, const uint8_t* w1, const at::Half* dm0, const at::Half* dm1,
                         const float* scales, const int8_t* xq, const int8_t* xr, const float* xd, const float* gs,
                         int64_t K, T* y, int64_t ldy, int64_t rows1, int64_t ahead) {
  const int64_t nb = K / QBLOCK;
  constexpr int chunks = Bits == 4 ? 4 : 8;  // 64-byte lines per block of 32 inputs
  constexpr int ops = Bits == 4 ? 2 : 1;     // products a line, token, term and row block
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i qs[MT][2], rs[MT][2];
    for (int t = 0; t < MT; ++t) qs[t][0] = qs[t][1] = rs[t][0] = rs[t][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int c = 0; c < chunks; ++c) {
      __m512i v[2][ops];  // per row block: 4-bit, the line's low and high nibble planes; 8-bit, the line
      const __m512i l0 = _mm512_loadu_si512(w0), l1 = _mm512_loadu_si512(w1);
      if constexpr (Bits == 4) {
        v[0][0] = _mm512_and_si512(l0, low4);
        v[0][1] = _mm512_and_si512(_mm512_srli_epi16(l0, 4), low4);
        v[1][0] = _mm512_and_si512(l1, low4);
        v[1][1] = _mm512_and_si512(_mm512_srli_epi16(l1, 4), low4);
      } else {
        v[0][0] = l0;
        v[1][0] = l1;
      }
      _mm_prefetch(reinterpret_cast<const char*>(w0) + ahead, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w1) + ahead, _MM_HINT_T1);
      w0 += 64;
      w1 += 64;
      // 4-bit: line c's bytes hold inputs 8c..8c+3 (low nibbles) and 8c+4..8c+7 (high); 8-bit: 4c..4c+3
      for (int t = 0; t < MT; ++t) {
        const int64_t off = t * K + b * QBLOCK + c * (Bits == 4 ? 8 : 4);
        const int32_t* xp = reinterpret_cast<const int32_t*>(xq + off);
        const int32_t* rp = reinterpret_cast<const int32_t*>(xr + off);
        for (int i = 0; i < ops; ++i) {
          const __m512i bq = bcast_reg(xp + i);
          qs[t][0] = _mm512_dpbusd_epi32(qs[t][0], v[0][i], bq);
          qs[t][1] = _mm512_dpbusd_epi32(qs[t][1], v[1][i], bq);
          if constexpr (Residual) {
            const __m512i br = bcast_reg(rp + i);
            rs[t][0] = _mm512_dpbusd_epi32(rs[t][0], v[0][i], br);
            rs[t][1] = _mm512_dpbusd_epi32(rs[t][1], v[1][i], br);
          }
        }
      }
    }
    __m512 dv[2], mv[2];
    if constexpr (Made) {
      for (int r = 0; r < 2; ++r) {
        dv[r] = _mm512_loadu_ps(scales + 64 * b + 32 * r);
        mv[r] = _mm512_loadu_ps(scales + 64 * b + 32 * r + 16);
      }
    } else {
      joined_scales<Residual, KS>(dm0, b, dv[0], mv[0]);
      joined_scales<Residual, KS>(dm1, b, dv[1], mv[1]);
    }
    for (int t = 0; t < MT; ++t) {
      const __m512 d = _mm512_set1_ps(xd[t * nb + b]), s = _mm512_set1_ps(gs[t * nb + b]);
      for (int r = 0; r < 2; ++r) {
        const __m512i sum = Residual ? _mm512_add_epi32(_mm512_slli_epi32(qs[t][r], 8), rs[t][r]) : qs[t][r];
        const __m512 fd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, _mm512_setzero_ps());
        acc[t][r] = _mm512_fmadd_ps(fd, dv[r], acc[t][r]);
        acc[t][r] = _mm512_fmadd_ps(mv[r], s, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    alignas(64) float out[32];
    _mm512_store_ps(out, acc[t][0]);
    _mm512_store_ps(out + 16, acc[t][1]);
    store_row(y + t * ldy, 16 + rows1, out);
  }
}
#endif

#if MIAOTUI_AVX2 || MIAOTUI_VNNI
// 8 rows' fp16 values stored at p, as floats.
inline __m256 halves8(const void* p) { return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p))); }

// Group g's d and m of rows 8h..8h+7: fp16 as stored, or (KS) from Q4_K's bytes, D * sc and -Dmin * mn (exact in
// fp32), as the VNNI kernel's group_scales.
template <bool KS>
inline void group_scales8(const at::Half* dm, int64_t g, int h, __m256& dv, __m256& mv) {
  if constexpr (KS) {
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(dm) + g / 8 * 320;
    auto bytes = [&](int64_t off) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + off))));
    };
    dv = _mm256_mul_ps(halves8(sb + 16 * h), bytes(64 + g % 8 * 16 + 8 * h));
    mv = _mm256_mul_ps(halves8(sb + 32 + 16 * h), bytes(192 + g % 8 * 16 + 8 * h));
  } else {
    dv = halves8(dm + g * 32 + 8 * h);
    mv = halves8(dm + g * 32 + 16 + 8 * h);
  }
}
#endif

#if MIAOTUI_AVX2

// One block of 16 output rows for MT tokens on AVX2, each 64-byte line as two halves of 8 rows x 4 bytes: `vpmaddubsw`
// multiplies unsigned codes by signed activation bytes and sums pairs to int16, `vpmaddwd` by ones sums pairs of those
// to int32 — per row the 4-byte sum `vpdpbusd` gives in one step. A block's int16 sums cannot overflow
// (8 x 2 x 15 x 127 < 2^15) and are widened once per block; the integer sums are exactly the VNNI kernel's. Both
// halves of a line take each activation broadcast. 4-bit codes only: 8-bit ones go through qgemm_block8 below.
// Residual as in the VNNI kernel.
template <int Bits, int MT, bool Residual, bool KS, typename T>
inline void qgemm_block(const uint8_t* w, const at::Half* dm, const int8_t* xq, const int8_t* xr,
                        const float* xd, const float* gs, int64_t K, int64_t group, T* y, int64_t ldy,
                        int64_t rows, int64_t ahead) {
  static_assert(Bits == 4, "AVX2 multiplies 8-bit codes in qgemm_block8");
  const int64_t ngroups = K / group, blocks_per_group = group / QBLOCK, nb = K / QBLOCK;
  constexpr int chunks = 4;  // 64-byte lines per block of 32 inputs
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256 unit = _mm256_set1_ps(1.f / RESIDUAL);
  alignas(32) float acc[MT][16] = {};
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256 fd[MT][2];
    for (int t = 0; t < MT; ++t) fd[t][0] = fd[t][1] = _mm256_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      __m256i qs[MT][2], rs[MT][2];
      for (int t = 0; t < MT; ++t) qs[t][0] = qs[t][1] = rs[t][0] = rs[t][1] = _mm256_setzero_si256();
      auto line = [&](int c) {  // line c of the block: 16 rows x inputs 8c..8c+7
        _mm_prefetch(reinterpret_cast<const char*>(w) + ahead, _MM_HINT_T0);
        __m256i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const __m256i line = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
          lo[h] = _mm256_and_si256(line, low4);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(line, 4), low4);
        }
        for (int t = 0; t < MT; ++t) {  // byte j: input 8c + j (low nibble) and 8c + j + 4 (high)
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + t * K + b * QBLOCK + c * 8);
          const int32_t* rp = reinterpret_cast<const int32_t*>(xr + t * K + b * QBLOCK + c * 8);
          const __m256i x0 = _mm256_set1_epi32(xp[0]), x1 = _mm256_set1_epi32(xp[1]);
          const __m256i r0 = _mm256_set1_epi32(rp[0]), r1 = _mm256_set1_epi32(rp[1]);
          for (int h = 0; h < 2; ++h) {
            qs[t][h] = _mm256_add_epi16(qs[t][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], x0),
                                                                   _mm256_maddubs_epi16(hi[h], x1)));
            if constexpr (Residual)
              rs[t][h] = _mm256_add_epi16(rs[t][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], r0),
                                                                     _mm256_maddubs_epi16(hi[h], r1)));
          }
        }
        w += 64;
      };
      if constexpr (MT >= 4) {
        for (int c = 0; c < chunks; ++c) line(c);
      } else {
        // One line at a time below 4 tokens: unrolled, the compiler hoisted all 4 lines' products ahead of their
        // sums and spilled them (16 registers); rolled, 1 / 2 / 3 tokens ran 4.5 / 11 / 9% faster (this build, Zen 4).
#pragma GCC unroll 1
        for (int c = 0; c < chunks; ++c) line(c);
      }
      for (int t = 0; t < MT; ++t) {  // q * 256 + r fits int32: |Σ| <= 32 * 15 * 127 * 257
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(xd[t * nb + b]), unit);
        for (int h = 0; h < 2; ++h) {
          const __m256i q = _mm256_slli_epi32(_mm256_madd_epi16(qs[t][h], ones), 8);
          const __m256i both = Residual ? _mm256_add_epi32(q, _mm256_madd_epi16(rs[t][h], ones)) : q;
          fd[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), scale, fd[t][h]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256 dv, mv;
      group_scales8<KS>(dm, g, h, dv, mv);
      for (int t = 0; t < MT; ++t) {
        __m256 a = _mm256_fmadd_ps(fd[t][h], dv, _mm256_load_ps(acc[t] + 8 * h));
        _mm256_store_ps(acc[t] + 8 * h, _mm256_fmadd_ps(mv, _mm256_set1_ps(gs[t * ngroups + g]), a));
      }
    }
  }
  for (int t = 0; t < MT; ++t) store_row(y + t * ldy, rows, acc[t]);
}
#endif

#if MIAOTUI_AVX2
// 8-bit codes on AVX2: each code widened to int16 once (`vpmovzxbw`) and multiplied by the activation's two int8
// terms joined into one int16, a = 256 q + r, with `vpmaddwd` — 16 products a instruction where the nibble planes
// above need four `vpmaddubsw` and their sums for the same 16 (a code times both terms, per plane). The sums are
// the same integers: Σ code * a = 256 Σ code q + Σ code r, and |Σ| <= 32 * 255 * 32639 < 2^31.
// A line's 16 bytes for rows 4j..4j+3 widen to 16 int16 (row-major, 4 inputs each); `vpmaddwd` against the
// broadcast (a0, a1, a2, a3) leaves per row two partial sums (inputs 0-1 and 2-3), joined per block by `vphaddd`.
template <int MT, typename T>
inline void qgemm_block8(const uint8_t* w, const at::Half* dm, const int16_t* xa, const float* xd, const float* gs,
                         int64_t K, int64_t group, T* y, int64_t ldy, int64_t rows) {
  const int64_t ngroups = K / group, blocks_per_group = group / QBLOCK, nb = K / QBLOCK;
  const __m256 unit = _mm256_set1_ps(1.f / RESIDUAL);
  __m256 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256 fd[MT][2];
    for (int t = 0; t < MT; ++t) fd[t][0] = fd[t][1] = _mm256_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      __m256i s[MT][4];
      for (int t = 0; t < MT; ++t)
        for (int j = 0; j < 4; ++j) s[t][j] = _mm256_setzero_si256();
      auto line = [&](int c) {  // line c: inputs 4c..4c+3 of the block
        _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH, _MM_HINT_T0);
        __m256i wv[4];
        for (int j = 0; j < 4; ++j)
          wv[j] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * j)));
        for (int t = 0; t < MT; ++t) {
          int64_t four;
          std::memcpy(&four, xa + t * K + b * QBLOCK + c * 4, 8);
          const __m256i xv = _mm256_set1_epi64x(four);
          for (int j = 0; j < 4; ++j) s[t][j] = _mm256_add_epi32(s[t][j], _mm256_madd_epi16(wv[j], xv));
        }
        w += 64;
      };
#pragma GCC unroll 1  // as qgemm_block's: unrolled, the lines' products were hoisted and spilled
      for (int c = 0; c < 8; ++c) line(c);
      for (int t = 0; t < MT; ++t) {
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(xd[t * nb + b]), unit);
        for (int h = 0; h < 2; ++h) {  // rows 8h..8h+7: hadd gives rows (0 1 4 5 | 2 3 6 7), the permute orders them
          const __m256i both = _mm256_permute4x64_epi64(_mm256_hadd_epi32(s[t][2 * h], s[t][2 * h + 1]), 0xD8);
          fd[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), scale, fd[t][h]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256 dv, mv;
      group_scales8<false>(dm, g, h, dv, mv);
      for (int t = 0; t < MT; ++t)
        acc[t][h] = _mm256_fmadd_ps(mv, _mm256_set1_ps(gs[t * ngroups + g]), _mm256_fmadd_ps(fd[t][h], dv, acc[t][h]));
    }
  }
  for (int t = 0; t < MT; ++t) {
    alignas(32) float out[16];
    _mm256_store_ps(out, acc[t][0]);
    _mm256_store_ps(out + 8, acc[t][1]);
    store_row(y + t * ldy, rows, out);
  }
}
#endif

#if MIAOTUI_AVX2 || MIAOTUI_VNNI
// Half h (rows 8h..8h+7) of the 6-bit layout's three lines at w as four planes of codes 0..63: plane p's byte 4r+j
// is input 4p+j of row r, as unpack6's lines (shifts and masks; 16-bit shifts, each byte then masked).
inline void unpack6_half(const uint8_t* w, int h, __m256i v[4]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), high2 = _mm256_set1_epi8(0x30);
  const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
  const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 + 32 * h));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
  v[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(hi, 4), high2));
  v[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                         _mm256_and_si256(_mm256_slli_epi16(hi, 2), high2));
  v[2] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(hi, high2));
  v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                         _mm256_and_si256(_mm256_srli_epi16(hi, 2), high2));
}
#endif

#if MIAOTUI_AVX2

// 6-bit codes on AVX2, MT tokens: per 16 inputs and half of the block (8 rows), the three lines' 32 bytes become
// four planes (unpack6_half) and each plane is widened to int16 by interleaving with zero, which puts rows
// (0 1 4 5) and (2 3 6 7) apart; `vpmaddwd` against the broadcast int16 activations (a = 256 q + r, as
// qgemm_block8's) leaves two partial sums a row, and one `vphaddd` of the two joins them with the rows back in
// order. Then the group's scale, as qgemm6_block's: y += D s (xd / 256 Σ q a - 32 Σ x); |Σ q a| <= 16 * 63 * 32639
// < 2^31.
template <int MT, typename T>
inline void qgemm6_block_avx2(const uint8_t* w, const uint8_t* sc, const int16_t* xa, const float* xd,
                              const float* gs, int64_t K, T* y, int64_t ldy, int64_t rows) {
  const int64_t nh = K / 16, nb = K / QBLOCK;
  const __m256i zero = _mm256_setzero_si256();
  alignas(32) float acc[MT][16] = {};
  for (int64_t sb = 0; sb < K / 256; ++sb, sc += 288) {
    __m256 dd[2];
    for (int h = 0; h < 2; ++h) dd[h] = _mm256_mul_ps(halves8(sc + 16 * h), _mm256_set1_ps(1.f / RESIDUAL));
    for (int64_t hh = 0; hh < 16; ++hh, w += 192) {
      const int64_t g = sb * 16 + hh, b = g / 2;
      for (int l = 0; l < 3; ++l) _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH + 64 * l, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {  // rows 8h..8h+7
        __m256i v[4], s[MT][2];
        unpack6_half(w, h, v);
        for (int t = 0; t < MT; ++t) s[t][0] = s[t][1] = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
          const __m256i lo = _mm256_unpacklo_epi8(v[p], zero), up = _mm256_unpackhi_epi8(v[p], zero);
          for (int t = 0; t < MT; ++t) {
            int64_t four;
            std::memcpy(&four, xa + t * K + g * 16 + 4 * p, 8);
            const __m256i xv = _mm256_set1_epi64x(four);
            s[t][0] = _mm256_add_epi32(s[t][0], _mm256_madd_epi16(lo, xv));
            s[t][1] = _mm256_add_epi32(s[t][1], _mm256_madd_epi16(up, xv));
          }
        }
        const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 32 + 16 * hh + 8 * h));
        const __m256 ds = _mm256_mul_ps(dd[h], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8)));
        for (int t = 0; t < MT; ++t) {
          const __m256 sum = _mm256_cvtepi32_ps(_mm256_hadd_epi32(s[t][0], s[t][1]));
          const __m256 part = _mm256_fmadd_ps(sum, _mm256_set1_ps(xd[t * nb + b]),
                                              _mm256_set1_ps(-32.f * RESIDUAL * gs[t * nh + g]));
          _mm256_store_ps(acc[t] + 8 * h, _mm256_fmadd_ps(part, ds, _mm256_load_ps(acc[t] + 8 * h)));
        }
      }
    }
  }
  for (int t = 0; t < MT; ++t) store_row(y + t * ldy, rows, acc[t]);
}

// Many rows on AVX2 (prefill, batched decode): a row block's 4- or 8-bit codes are widened once to int16, in pairs of
// inputs (pair p: rows 0-7 then 8-15, two inputs each), and every activation row meets them in `vpmaddwd` against its
// broadcast pair of int16 terms (a = 256 q + r, as qgemm_block8's): 16 products an instruction with no nibble
// unpacking per pass of tokens.
// The integer sums per block are the block kernels' (|Σ| <= 32 * 255 * 32639 < 2^31) and the float steps after
// them are theirs in the same order, so a row's result does not depend on which kernel took it: a batch's rows and
// a speculative check's equal the one-row step's, bit for bit (the fp32 kernel of prompts would not: it keeps to
// dense_min_rows).
template <int Bits>
inline void widen_pairs(const uint8_t* w, int64_t K, int16_t* out) {
  // Within each 128-bit lane (4 rows x 4 bytes): bytes j and j + 1 of each row, each zero-extended to int16.
  const __m256i pair01 = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1,
                                          0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
  const __m256i pair23 = _mm256_add_epi8(pair01, _mm256_setr_epi8(2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0,
                                                                  2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  for (int64_t c = 0; c < K * Bits / 32; ++c, w += 64, o += 2 * 16 / Bits) {  // line c: 16 / Bits pairs
    for (int h = 0; h < 2; ++h) {  // rows 8h..8h+7
      const __m256i line = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
      if constexpr (Bits == 4) {  // inputs 0-3 in the low nibbles, 4-7 in the high ones: pairs 0, 1 and 2, 3
        const __m256i lo = _mm256_and_si256(line, low4), hi = _mm256_and_si256(_mm256_srli_epi16(line, 4), low4);
        _mm256_storeu_si256(o + h, _mm256_shuffle_epi8(lo, pair01));
        _mm256_storeu_si256(o + 2 + h, _mm256_shuffle_epi8(lo, pair23));
        _mm256_storeu_si256(o + 4 + h, _mm256_shuffle_epi8(hi, pair01));
        _mm256_storeu_si256(o + 6 + h, _mm256_shuffle_epi8(hi, pair23));
      } else {
        _mm256_storeu_si256(o + h, _mm256_shuffle_epi8(line, pair01));
        _mm256_storeu_si256(o + 2 + h, _mm256_shuffle_epi8(line, pair23));
      }
    }
  }
}

// MT tokens against one widened row block (KS: Q4_K's scales; 8-bit codes take fp16 ones).
template <int MT, bool KS, typename T>
inline void qgemm_wide_block(const int16_t* wide, const at::Half* dm, const int16_t* xa, const float* xd,
                             const float* gs, int64_t K, int64_t group, T* y, int64_t ldy, int64_t rows) {
  const int64_t ngroups = K / group, blocks_per_group = group / QBLOCK, nb = K / QBLOCK;
  const __m256 unit = _mm256_set1_ps(1.f / RESIDUAL);
  alignas(32) float acc[MT][16] = {};
  for (int64_t g = 0; g < ngroups; ++g) {
    alignas(32) float fd[MT][16] = {};
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      const __m256i* wp = reinterpret_cast<const __m256i*>(wide + b * QBLOCK * 16);
      __m256i s[MT][2];
      for (int t = 0; t < MT; ++t) s[t][0] = s[t][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int p = 0; p < QBLOCK / 2; ++p, wp += 2) {
        const __m256i w0 = _mm256_load_si256(wp), w1 = _mm256_load_si256(wp + 1);
        for (int t = 0; t < MT; ++t) {
          int32_t two;
          std::memcpy(&two, xa + t * K + b * QBLOCK + 2 * p, 4);
          const __m256i xv = _mm256_set1_epi32(two);
          s[t][0] = _mm256_add_epi32(s[t][0], _mm256_madd_epi16(w0, xv));
          s[t][1] = _mm256_add_epi32(s[t][1], _mm256_madd_epi16(w1, xv));
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(xd[t * nb + b]), unit);
        for (int h = 0; h < 2; ++h)
          _mm256_store_ps(fd[t] + 8 * h,
                          _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t][h]), scale, _mm256_load_ps(fd[t] + 8 * h)));
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256 dv, mv;
      group_scales8<KS>(dm, g, h, dv, mv);
      for (int t = 0; t < MT; ++t) {
        const __m256 a = _mm256_fmadd_ps(_mm256_load_ps(fd[t] + 8 * h), dv, _mm256_load_ps(acc[t] + 8 * h));
        _mm256_store_ps(acc[t] + 8 * h, _mm256_fmadd_ps(mv, _mm256_set1_ps(gs[t * ngroups + g]), a));
      }
    }
  }
  for (int t = 0; t < MT; ++t) store_row(y + t * ldy, rows, acc[t]);
}
#endif

#if MIAOTUI_VNNI || MIAOTUI_AVX2
// Tokens 0..M-1 in passes of Tile, the rest in one pass of its own size: f(m, tokens) for each pass from token m,
// its size a compile-time constant (std::integral_constant) for the block kernels' templates.
template <int Tile, typename F>
inline void token_passes(int64_t M, F&& f) {
  static_assert(Tile >= 1 && Tile <= 6, "token_passes: passes of 1 to 6 tokens");
  for (int64_t m = 0; m < M;) {
    const int64_t n = std::min<int64_t>(Tile, M - m);
    switch (n) {
      case 1: f(m, std::integral_constant<int, 1>{}); break;
      case 2: if constexpr (Tile >= 2) f(m, std::integral_constant<int, 2>{}); break;
      case 3: if constexpr (Tile >= 3) f(m, std::integral_constant<int, 3>{}); break;
      case 4: if constexpr (Tile >= 4) f(m, std::integral_constant<int, 4>{}); break;
      case 5: if constexpr (Tile >= 5) f(m, std::integral_constant<int, 5>{}); break;
      default: if constexpr (Tile >= 6) f(m, std::integral_constant<int, 6>{}); break;
    }
    m += n;
  }
}

#if MIAOTUI_VNNI
// The fewest tokens whose row blocks of `bits`-bit codes go two at a time (qgemm_block2, qgemm6_block2; the sums
// are the same either way): 2, as qgemm_rows_terms explains, with two exceptions for 4- and 6-bit codes.
// - AMX builds, 1: a core there streams ~13 GB/s, half the host's read, and two streams a thread keep more lines in
//   flight (family 6 model 167, Qwen2.5-Coder-1.5B's products run back to back, three alternations: 4-bit ones
//   1.04-1.13x, 6-bit ones 1.03-1.07x; its decode step 1.05-1.07x in a slow phase of the host's memory, level in a
//   fast one). Not 8-bit rows: Gemma-3-270M's head (8-bit, 640 inputs, held in that host's L3) ran 1.18x slower in
//   pairs.
// - A Zen 5 (AMD family 1Ah), 7: there one token's pairs made Qwen's decode steps 1.27x slower (22.1-23.2 -> 27.9-29.5
//   ms, four alternations; x86 family 26 model 2), and a pair's two streams read Qwen's 4-bit rows of 1536 inputs
//   (row blocks 12 KB apart) at 22-28 GB/s against one block's 35-42 at 2 tokens and 23-28 against 37-38 at 4, the
//   pair ahead only from 8 tokens (products bound by the arithmetic there, each broadcast feeding two); rows of 8960
//   inputs and 8-bit codes level or ahead in pairs at 2 tokens. Zen 4 not measured.
inline int64_t pair_tokens(int bits) {
  if (MIAOTUI_AMX) return bits == 8 ? 2 : 1;
  static const bool zen5 = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__builtin_cpu_is("amd") || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    return ((a >> 8) & 0xF) + ((a >> 20) & 0xFF) >= 0x1A;  // base family + extended family
  }();
  return zen5 && bits != 8 ? 7 : 2;
}

// 6-bit row blocks, the tokens up to 6 at a time (as qgemm_rows_terms; against 4, the 6-bit products of a
// Qwen2.5-1.5B step of 5 rows 1.08x faster, 6 and 9 rows 1.02x, 16 level: Zen 4, 6 pairs alternated in one process;
// 1-4 rows take the same passes). Where they take more than one pass, the first
// also keeps the block's lines unpacked (16 x K bytes, in L1/L2) and the others read those, asking meanwhile for the
// next block's lines: the unpacking is done once, not once a pass (Qwen2.5-1.5B's head at 9 rows, Zen 4: 0.84x the
// speed of its 8-bit codes unpacking every pass, 0.92x unpacking once).
template <bool Residual, typename T>
void qgemm6_rows(const uint8_t* w, const uint8_t* sc, const QuantX& x, int64_t M, int64_t K, int64_t N, T* y,
                 int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * 6 / 8, nh = K / 16, nb = K / QBLOCK;
  constexpr int TILE = 6;
  std::vector<uint8_t> unpacked(M > TILE ? 16 * K : 0);
  if (M >= pair_tokens(6)) {  // row blocks two at a time, as qgemm_rows_terms
    constexpr int TILE2 = Residual ? 4 : 6;
    std::vector<uint8_t> kept(M > TILE2 ? 2 * 16 * K : 0);
    uint8_t* keep[2] = {kept.data(), kept.data() + 16 * K};
    const uint8_t* keptp[2] = {keep[0], keep[1]};
    bool first = true;
    for (; rb_begin + 1 < rb_end; rb_begin += 2) {
      const uint8_t* wb[2] = {w + rb_begin * line_bytes, w + (rb_begin + 1) * line_bytes};
      const uint8_t* sb[2] = {sc + rb_begin * K / 256 * 288, sc + (rb_begin + 1) * K / 256 * 288};
      // the first pass streams the pair's lines; the others read them unpacked and ask for the next pair's
      const char* ahead[2] = {reinterpret_cast<const char*>(wb[0]) + PREFETCH_VNNI,
                              reinterpret_cast<const char*>(wb[1]) + PREFETCH_VNNI};
      const char* next[2] = {reinterpret_cast<const char*>(wb[0] + 2 * line_bytes),
                             reinterpret_cast<const char*>(wb[1] + 2 * line_bytes)};
      const bool last = rb_begin + 3 >= rb_end;
      if (last) next[0] = ahead[0], next[1] = ahead[1];
      const int64_t rows1 = std::min<int64_t>(16, N - rb_begin * 16 - 16);
      token_passes<TILE2>(M, [&](int64_t m, auto tokens) {
        auto pass = [&](auto from_kept, const uint8_t* const* lines, const char* const* pf, uint8_t* const* kp) {
          qgemm6_block2<decltype(tokens)::value, Residual, decltype(from_kept)::value>(
              lines, sb, x.q.data() + m * K, x.r.data() + m * K, x.d.data() + m * nb, x.gsum.data() + m * nh, K,
              y + m * N + rb_begin * 16, N, rows1, pf, kp);
        };
        // Between the first pair and the last, with two passes or more, pass p < 2 asks for the next pair's block
        // p alone: the next lines stream during both passes, not only while the second one computes (Qwen2.5-1.5B's
        // head, streamed, at 8-16 tokens: 1.02-1.06x; Zen 5, alternated in one process).
        const int64_t p = m / TILE2;
        const char* spread[2] = {p < 2 ? next[p] : nullptr, nullptr};
        const bool spreading = !first && !last && M > TILE2;
        if (m > 0) pass(std::true_type{}, keptp, spreading ? spread : next, nullptr);
        else pass(std::false_type{}, wb, spreading ? spread : ahead, M > TILE2 ? keep : nullptr);
      });
      first = false;
    }
  }
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    const uint8_t* wb = w + rb * line_bytes;
    const uint8_t* sb = sc + rb * K / 256 * 288;
    const char* next = reinterpret_cast<const char*>(rb + 1 < rb_end ? wb + line_bytes : wb + PREFETCH_VNNI);
    const int64_t rows = std::min<int64_t>(16, N - rb * 16);
    token_passes<TILE>(M, [&](int64_t m, auto tokens) {
      constexpr int MT = decltype(tokens)::value;
      const int8_t* xq = x.q.data() + m * K;
      const int8_t* xr = x.r.data() + m * K;
      const float* xd = x.d.data() + m * nb;
      const float* gs = x.gsum.data() + m * nh;
      T* ym = y + m * N + rb * 16;
      if (m > 0)
        qgemm6_block<MT, Residual, true>(unpacked.data(), sb, xq, xr, xd, gs, K, ym, N, rows, next, nullptr);
      else
        qgemm6_block<MT, Residual, false>(wb, sb, xq, xr, xd, gs, K, ym, N, rows,
                                          reinterpret_cast<const char*>(wb) + PREFETCH_VNNI,
                                          M > TILE ? unpacked.data() : nullptr);
    });
  }
}
#endif

// Row blocks of 16 outputs, the tokens TILE at a time, through this class's block kernel above.
template <int Bits, bool Residual, bool KS, typename T>
void qgemm_rows_terms(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                      int64_t N, T* y, int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group, nb = K / QBLOCK;
  // Tokens per pass: each line is unpacked once for them. AVX2 (measured on a Zen 3 at 4 and 32 rows): 4-bit codes
  // 4 (10-18% faster than 2; 8 spills), 8-bit codes 2 (4 spills its 16 accumulators: 14% slower). VNNI: 6, below.
  constexpr int TILE = MIAOTUI_VNNI ? 6 : (Bits == 4 ? 4 : 2);
#if MIAOTUI_VNNI
  // Row blocks two at a time where more than one token shares them (one token streams its weights from memory:
  // its products wait on the bytes, not on the broadcasts). Ice Lake Xeon, one thread, 16 x 4-bit rows of 576
  // inputs at 32 tokens: 1.67x qgemm_block's rate at two terms (2.9 against 1.76 G products a second; 4 tokens a
  // pass, 3 within noise of it, 5 spills: 0.6x), 1.7x at one term (6 tokens a pass, 5 level); Qwen2.5-1.5B-sized
  // 4-bit rows streamed from memory (24 copies), two threads: 4 rows 1.2x, 8 rows 1.5x, 1-3 rows level. From how
  // many tokens on, per CPU: pair_tokens.
  if (group == QBLOCK && M >= pair_tokens(Bits)) {
    constexpr int TILE2 = Residual ? 4 : 6;
    const int64_t sh = scale_halves(Bits, K, group, KS);
    std::vector<float> scales(M > TILE2 ? 64 * nb : 0);
    // (Prompt-sized, each pair passes over every token's activations, from L3 where they outgrow L2: chunks of
    // tokens kept in L2 across the pairs ran 0.8-0.9x on Qwen2.5-1.5B-sized rows at 512 tokens, the weights read
    // again a chunk.)
    for (; rb_begin + 1 < rb_end; rb_begin += 2) {
      const uint8_t* wb = w + rb_begin * line_bytes;
      const at::Half* dmb = dm + rb_begin * sh;
      const int64_t rows1 = std::min<int64_t>(16, N - rb_begin * 16 - 16);
      if (!scales.empty()) pair_scales<Residual, KS>(dmb, dmb + sh, nb, scales.data());
      token_passes<TILE2>(M, [&](int64_t m, auto tokens) {
        const int64_t ahead = m > 0 && rb_begin + 3 < rb_end ? 2 * line_bytes
                              : line_bytes >= PREFETCH_VNNI ? PREFETCH_VNNI : PREFETCH;
        auto pass = [&](auto made) {
          qgemm_block2<Bits, decltype(tokens)::value, Residual, KS, decltype(made)::value>(wb, wb + line_bytes,
              dmb, dmb + sh, scales.data(), x.q.data() + m * K, x.r.data() + m * K, x.d.data() + m * nb,
              x.gsum.data() + m * ngroups, K, y + m * N + rb_begin * 16, N, rows1, ahead);
        };
        if (scales.empty()) pass(std::false_type{});
        else pass(std::true_type{});
      });
    }
  }
#endif
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    const uint8_t* wb = w + rb * line_bytes;
    const at::Half* dmb = dm + rb * scale_halves(Bits, K, group, KS);
    const int64_t rows = std::min<int64_t>(16, N - rb * 16);
    // How far ahead a tile asks for weight lines: the first tile streams this row block's from memory; the
    // others read them again from L1/L2 and ask for the next block's instead, which then arrives while this one
    // computes (the rows' arithmetic and the weights' stream overlap, not add up).
    // (AVX2: unmeasured on an AVX2 host, left streaming.)
    auto ahead = [&](int64_t m) {
      if (!MIAOTUI_VNNI) return PREFETCH;
      return m > 0 && rb + 1 < rb_end ? line_bytes : line_bytes >= PREFETCH_VNNI ? PREFETCH_VNNI : PREFETCH;
    };
#if MIAOTUI_AVX2
    if constexpr (Bits == 8) {
      token_passes<TILE>(M, [&](int64_t m, auto tokens) {
        qgemm_block8<decltype(tokens)::value>(wb, dmb, x.a.data() + m * K, x.d.data() + m * nb,
                                              x.gsum.data() + m * ngroups, K, group, y + m * N + rb * 16, N, rows);
      });
    } else {
#else
    {
#endif
      // Passes of TILE tokens, the rest in one pass of its own size (speculative checks: a few rows a sequence).
      // VNNI at 6 (29 of 32 registers at two terms) against 4 with the rest in passes of 3, 2 and 1: steps of 5 / 9
      // / 16 rows 1.04-1.06x / 1.02x / 1.02x faster (SmolLM2 and Qwen2.5-1.5B, Zen 4, paired), 1 and 4 rows level.
      token_passes<TILE>(M, [&](int64_t m, auto tokens) {
        qgemm_block<Bits, decltype(tokens)::value, Residual, KS>(wb, dmb, x.q.data() + m * K, x.r.data() + m * K,
            x.d.data() + m * nb, x.gsum.data() + m * ngroups, K, group, y + m * N + rb * 16, N, rows, ahead(m));
      });
    }
  }
}

#if MIAOTUI_AVX2
// 6-bit row blocks on AVX2, the tokens up to three at a time (each pass unpacks the lines again): against passes of
// two, a Qwen2.5-1.5B step of 9 rows 1.03x faster, of 4 rows 1.01x, 1 row level (the AVX2 build on a Zen 4).
template <typename T>
void qgemm6_rows_avx2(const uint8_t* w, const uint8_t* sc, const QuantX& x, int64_t M, int64_t K, int64_t N, T* y,
                      int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * 6 / 8, nh = K / 16, nb = K / QBLOCK;
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    const uint8_t* wb = w + rb * line_bytes;
    const uint8_t* sb = sc + rb * K / 256 * 288;
    const int64_t rows = std::min<int64_t>(16, N - rb * 16);
    token_passes<3>(M, [&](int64_t m, auto tokens) {
      qgemm6_block_avx2<decltype(tokens)::value>(wb, sb, x.a.data() + m * K, x.d.data() + m * nb,
                                                 x.gsum.data() + m * nh, K, y + m * N + rb * 16, N, rows);
    });
  }
}

// From this many rows on, AVX2 takes 8-bit codes, and 4-bit ones at two activation terms, through the widened kernel
// above (up to dense_min_rows).
// Against the block kernels (the avx2 build on a Zen 4, alternated in one process, SmolLM2-135M's five products):
// 1.0-1.1x at 8 rows, 1.0-1.3x at 12-32, 1.1-1.2x at 96; SmolLM2's 32 x (64, 128) batch 1.07x (324 -> 346 tok/s).
constexpr int64_t WIDE_MIN_ROWS = 8;

// Row blocks through qgemm_wide_block, each widened once into this thread's buffer (16 x K int16, in L2) and then
// passed over by every token, 3 at a time: 6 sums, two weight vectors and a broadcast. At 4-6 tokens a pass GCC
// spilled sums inside the loop (12 sums leave no room for its copies) and SmolLM2's products at 32 and 96 rows ran
// 0.70-0.80x as fast as at 3 (the avx2 build on a Zen 4, variants alternated in one process).
template <int Bits, bool KS, typename T>
void qgemm_wide_rows(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                     int64_t N, T* y, int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group, nb = K / QBLOCK;
  Tensor wide_ = at::empty({16 * K}, at::kShort);  // 64-byte aligned: the kernel's aligned loads
  int16_t* wide = wide_.data_ptr<int16_t>();
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    widen_pairs<Bits>(w + rb * line_bytes, K, wide);
    const at::Half* dmb = dm + rb * scale_halves(Bits, K, group, KS);
    const int64_t rows = std::min<int64_t>(16, N - rb * 16);
    token_passes<3>(M, [&](int64_t m, auto tokens) {
      qgemm_wide_block<decltype(tokens)::value, KS>(wide, dmb, x.a.data() + m * K, x.d.data() + m * nb,
                                                    x.gsum.data() + m * ngroups, K, group, y + m * N + rb * 16, N,
                                                    rows);
    });
  }
}
#endif

// ks: Q4_K's scales.
template <int Bits, typename T>
void qgemm_rows(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                int64_t N, T* y, int64_t rb_begin, int64_t rb_end, bool ks) {
#if MIAOTUI_VNNI
  if constexpr (Bits == 6) {
    const uint8_t* sc = reinterpret_cast<const uint8_t*>(dm);
    if (x.residual) qgemm6_rows<true>(w, sc, x, M, K, N, y, rb_begin, rb_end);
    else qgemm6_rows<false>(w, sc, x, M, K, N, y, rb_begin, rb_end);
  } else
#elif MIAOTUI_AVX2
  if constexpr (Bits == 6) {
    qgemm6_rows_avx2(w, reinterpret_cast<const uint8_t*>(dm), x, M, K, N, y, rb_begin, rb_end);
  } else
#endif
  if (ks) {
    if constexpr (Bits == 4) {
      if (x.residual) qgemm_rows_terms<Bits, true, true>(w, dm, x, M, K, group, N, y, rb_begin, rb_end);
      else qgemm_rows_terms<Bits, false, true>(w, dm, x, M, K, group, N, y, rb_begin, rb_end);
    }
  } else if (x.residual) qgemm_rows_terms<Bits, true, false>(w, dm, x, M, K, group, N, y, rb_begin, rb_end);
  else qgemm_rows_terms<Bits, false, false>(w, dm, x, M, K, group, N, y, rb_begin, rb_end);
}
#endif

// An fp16 value stored at p (file blocks and the byte scale layouts).
inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Group g's d and m of row r in a row block's scales, as the kernels take them: fp16, or (ks) from Q4_K's bytes.
inline void row_scales(const at::Half* dm, bool ks, int64_t g, int r, float& d, float& m) {
  if (!ks) {
    d = static_cast<float>(dm[g * 32 + r]);
    m = static_cast<float>(dm[g * 32 + 16 + r]);
    return;
  }
  const uint8_t* sb = reinterpret_cast<const uint8_t*>(dm) + g / 8 * 320;
  d = f16(sb + 2 * r) * static_cast<float>(sb[64 + g % 8 * 16 + r]);
  m = f16(sb + 32 + 2 * r) * static_cast<float>(sb[192 + g % 8 * 16 + r]);
}

// The 6-bit layout, one weight at a time: the code (0..63) of input k of row r in the row block at wb, and the
// scale D * s of its group from the row block's scales sb.
inline int code6(const uint8_t* wb, int64_t k, int r) {
  const uint8_t* lines = wb + k / 16 * 192;
  const int p = static_cast<int>(k % 16) / 4, j = static_cast<int>(k % 4);
  const uint8_t nibbles = lines[(p / 2) * 64 + r * 4 + j];
  return ((p % 2 ? nibbles >> 4 : nibbles) & 0x0F) | (((lines[128 + r * 4 + j] >> (2 * p)) & 3) << 4);
}
inline float scale6(const uint8_t* sb, int64_t k, int r) {
  const uint8_t* s = sb + k / 256 * 288;
  return f16(s + 2 * r) * static_cast<float>(static_cast<int8_t>(s[32 + (k % 256) / 16 * 16 + r]));
}
// Row r of a 6-bit row block (codes wb, scales sb) as K floats D s (q - 32).
inline void row6(const uint8_t* wb, const uint8_t* sb, int64_t K, int r, float* o) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const float s = scale6(sb, k0, r);
    for (int64_t k = k0; k < k0 + 16; ++k) o[k] = s * static_cast<float>(code6(wb, k, r) - 32);
  }
}

// Prefill-sized products without VNNI are taken in fp32: the result is x @ (d q + m)^T, the dense model's product
// on the same weights. On an AVX2 core a 16-bit integer product and an fp32 FMA both do 16 multiply-adds a cycle
// (measured on a Zen 4: `vpmaddwd` 1, `vfmadd` 2 per cycle), and the activations need 16 bits, so the integers have
// nothing to gain there; AVX2 builds multiply in their own kernel (fgemm_rows, below), the portable build
// dequantizes a chunk of rows for torch's GEMM. Where it pays (measured against the integer block kernels, when
// torch's GEMM took these): from 96 rows for 4-bit codes, from 40 for 8-bit ones.
// The AVX-512 build takes them in fp32 too where the CPU has no BF16 units (Intel's AVX-512 cores before Sapphire
// Rapids; a server core's two FMA ports do 32 fp32 multiply-adds a cycle) for the codes its two-row-block kernels
// do not take: 4- and 8-bit ones in groups other than 32. Those run qgemm_block, one broadcast a product, which an
// Ice Lake Xeon (family 6 model 106, 2 cores, the two in turn on the models' own weights, medians of 7) took
// 1.15-1.40x slower than fp32 at 48-512 rows. Groups of 32 and 6-bit codes stay on integers at every row count
// since qgemm_block2 and qgemm6_block2 (one thread, alternated processes, 2-3 each): Qwen2.5-1.5B-sized 4-bit
// products 1.35-1.5x faster than fp32 at 512 rows and 1.2-1.45x at 64, SmolLM2's 1.1-1.3x at 64 and level to 1.1x
// at 512; Q6_K rows of 8960 inputs 1.15-1.25x at 48-512. With one activation term (`--activation-bits 8`) the
// integers stay ahead everywhere, as do CPUs with the BF16 units, whose bf16 activations take bf16_qmatmul and whose
// fp32 ones (not the default there, not measured against this kernel) the integers.
inline int64_t dense_min_rows(int64_t bits) {
  if (MIAOTUI_VNNI) return 48;
  return bits == 4 ? 96 : 40;
}
// Whether prefill-sized products go to fp32 on this build and CPU (see above). AVX2's 4-bit codes under one
// activation term stay on integers: `vpmaddubsw` does 32 products a cycle where fp32 does 16 (the avx2 build on a Zen
// 4, `--activation-bits 8`, alternated in one engine: 512-token prompts 1.23x on Qwen2.5-1.5B, 1.10x on SmolLM2).
inline bool fp32_prompts(int64_t bits, int64_t group, int64_t act_bits) {
#if MIAOTUI_VNNI
  return act_bits == 16 && !dp::bf16_units() && group != QBLOCK && bits != 6;
#elif MIAOTUI_AVX2
  (void)group;
  return !(bits == 4 && act_bits == 8);
#else
  (void)group, (void)bits, (void)act_bits;
  return true;
#endif
}
constexpr int64_t DENSE_CHUNK_ELEMS = 1 << 22;  // rows per chunk: 16 MB of fp32 weights

// One row's 4 bytes of a 64-byte line as floats d * q + m: 8 values (4-bit: inputs 0-3 in the low nibbles, 4-7 in
// the high ones) or 4 (8-bit).
template <int Bits>
inline void dequantize_word(uint32_t word, float d, float m, float* out) {
#if MIAOTUI_AVX2
  if (Bits == 4) {
    const uint64_t codes = (word & 0x0F0F0F0Fu) | (static_cast<uint64_t>((word >> 4) & 0x0F0F0F0Fu) << 32);
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(codes))));
    _mm256_storeu_ps(out, _mm256_fmadd_ps(v, _mm256_set1_ps(d), _mm256_set1_ps(m)));
  } else {
    const __m128 v = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(word))));
    _mm_storeu_ps(out, _mm_fmadd_ps(v, _mm_set1_ps(d), _mm_set1_ps(m)));
  }
  return;
#endif
  for (int j = 0; j < 4; ++j) {
    const uint32_t b = (word >> (8 * j)) & 0xFF;
    if (Bits == 4) {
      out[j] = static_cast<float>(b & 0x0F) * d + m;
      out[j + 4] = static_cast<float>(b >> 4) * d + m;
    } else {
      out[j] = static_cast<float>(b) * d + m;
    }
  }
}

// Row blocks rb_begin .. rb_end of 4- or 8-bit codes as fp32 rows d * q + m (the portable build's prompts; 6-bit
// codes exist only in the VNNI and AVX2 builds, whose prompts take their own kernels).
template <int Bits>
void dequantize_rows(const uint8_t* w, const at::Half* dm, int64_t K, int64_t group, int64_t rb_begin,
                     int64_t rb_end, int64_t N, float* out, bool ks) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group;
  constexpr int per_line = Bits == 4 ? 8 : 4;  // inputs per 64-byte line
  at::parallel_for(rb_begin, rb_end, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> d(16 * ngroups), m(16 * ngroups);
    for (int64_t rb = b0; rb < b1; ++rb) {
      const at::Half* dmb = dm + rb * scale_halves(Bits, K, group, ks);
      for (int64_t g = 0; g < ngroups; ++g)
        for (int r = 0; r < 16; ++r) row_scales(dmb, ks, g, r, d[r * ngroups + g], m[r * ngroups + g]);
      const int64_t rows = std::min<int64_t>(16, N - rb * 16);
      const uint8_t* line = w + rb * line_bytes;
      float* o = out + (rb - rb_begin) * 16 * K;
      for (int64_t c = 0; c < K / per_line; ++c, line += 64) {
        const int64_t k0 = c * per_line, g = k0 / group;  // a line's inputs lie in one group
        for (int r = 0; r < rows; ++r) {
          uint32_t word;  // the row's 4 bytes of this line
          std::memcpy(&word, line + r * 4, 4);
          dequantize_word<Bits>(word, d[r * ngroups + g], m[r * ngroups + g], o + r * K + k0);
        }
      }
    }
  });
}

#if MIAOTUI_AVX2 || MIAOTUI_VNNI
// Prefill-sized products on AVX2, and on AVX-512 without BF16 units (dense_qmatmul), in fp32 FMA. Each thread widens
// a chunk of FKC inputs of FG row blocks to fp32, input-major (16 outputs of an input side by side, in L1/L2), and
// every activation row passes over it 5 at a time on AVX2: 10 sums, two weight vectors and a broadcast (at 6, 15
// registers, GCC spilled two sums inside the loop: 0.5x); 6 at a time against all 4 blocks on AVX-512 (ftile16).
// Against torch's fp32 GEMM over a dequantized chunk of rows in memory, which this replaced (the avx2 build on a Zen
// 4, the two alternated in one process): SmolLM2-135M's products at 96-512 rows 1.1-1.4x, a 512-token prompt 1.21x
// (542 -> 655 tok/s); Qwen2.5-Coder-1.5B's 512-token prompt 1.11x (58 -> 65 tok/s), ~85% of the 16-a-cycle peak. On
// an Ice Lake's AVX-512 the same shapes reach 190-260 GFLOP/s on 2 cores, torch's fp32 GEMM on dense weights 200-300.
// The values are the same d * q + m (D s (q - 32) for 6-bit codes).
constexpr int64_t FKC = 256;  // inputs a chunk: a row block's 16 KB, in L1
constexpr int64_t FG = 4;  // row blocks a chunk: each activation row's chunk is read once for 64 outputs

// A half line's 32 bytes (rows 8h..8h+7 x 4 bytes, byte 4r+j: input j of row r) regrouped input-major: bytes
// 8j..8j+7 hold input j of the 8 rows.
inline __m256i inputs_major(__m256i v) {
  const __m256i by_input = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, by_input), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Inputs k .. k+3 of 8 rows (bytes from inputs_major) as floats fma(q, d, m) at out + 16 (k + j), d and m per row.
inline void store_inputs(__m256i t, __m256 d, __m256 m, float* out) {
  const __m128i lo = _mm256_castsi256_si128(t), hi = _mm256_extracti128_si256(t, 1);
  const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int j = 0; j < 4; ++j)
    _mm256_store_ps(out + 16 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[j])), d, m));
}

// Inputs k0 .. k0+kc of one row block (codes w, scales dm) as fp32 out [kc][16].
template <int Bits, bool KS>
void widen_f32(const uint8_t* w, const at::Half* dm, int64_t K, int64_t group, int64_t k0, int64_t kc, float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (Bits == 6) {  // per 16 inputs three lines (192 bytes) and a scale byte per row; k0 % 256 == 0
    const uint8_t* sc = reinterpret_cast<const uint8_t*>(dm) + k0 / 256 * 288;
    __m256 dd[2];
    for (int h = 0; h < 2; ++h) dd[h] = halves8(sc + 16 * h);
    for (int64_t hh = 0; hh < kc / 16; ++hh)
      for (int h = 0; h < 2; ++h) {
        __m256i v[4];
        unpack6_half(w + (k0 / 16 + hh) * 192, h, v);
        const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 32 + 16 * hh + 8 * h));
        const __m256 ds = _mm256_mul_ps(dd[h], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8)));
        const __m256 ms = _mm256_mul_ps(ds, _mm256_set1_ps(-32.f));
        for (int p = 0; p < 4; ++p) store_inputs(inputs_major(v[p]), ds, ms, out + (16 * hh + 4 * p) * 16 + 8 * h);
      }
  } else {
    constexpr int per_line = Bits == 4 ? 8 : 4;
    for (int64_t k = 0; k < kc; k += per_line) {
      const uint8_t* line = w + (k0 + k) / per_line * 64;
      const int64_t g = (k0 + k) / group;  // a line's inputs lie in one group
      for (int h = 0; h < 2; ++h) {
        __m256 d, m;
        group_scales8<KS>(dm, g, h, d, m);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32 * h));
        float* o = out + k * 16 + 8 * h;
        if constexpr (Bits == 4) {  // inputs 0-3 in the low nibbles, 4-7 in the high ones
          store_inputs(inputs_major(_mm256_and_si256(v, low4)), d, m, o);
          store_inputs(inputs_major(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4)), d, m, o + 64);
        } else {
          store_inputs(inputs_major(v), d, m, o);
        }
      }
    }
  }
}

#if MIAOTUI_VNNI
// The AVX-512 build's tile (Intel cores without BF16 units, see fp32_prompts): a row block's 16 outputs are one
// vector, so MT activation rows meet all NB widened blocks of a chunk (wt: NB chunks [kc][16], kc * 16 floats
// apart) — MT x NB sums, NB weight vectors and a broadcast, 29 of the 32 registers at 6 x 4. Block i's outputs go
// to yb[i] (row stride ld[i]; set on the first chunk).
constexpr int FT = 6;  // activation rows a pass
template <int MT, int NB>
inline void ftile16(const float* x, int64_t ldx, const float* wt, int64_t kc, float* const* yb, const int64_t* ld,
                    bool first) {
  __m512 acc[MT][NB];
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < NB; ++i) acc[t][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(yb[i] + t * ld[i]);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 w[NB];
    for (int i = 0; i < NB; ++i) w[i] = _mm512_load_ps(wt + (i * kc + k) * 16);
    for (int t = 0; t < MT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + k]);
      for (int i = 0; i < NB; ++i) acc[t][i] = _mm512_fmadd_ps(w[i], xb, acc[t][i]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < NB; ++i) _mm512_storeu_ps(yb[i] + t * ld[i], acc[t][i]);
}
#else
// MT activation rows (x, row stride ldx) times a widened chunk wt [kc][16], added to y's 16 outputs (row stride
// ldy; set on the first chunk). No masks here: two more live registers made GCC spill sums inside the loop.
constexpr int FT = 5;  // activation rows a pass
template <int MT>
inline void ftile(const float* x, int64_t ldx, const float* wt, int64_t kc, float* y, int64_t ldy, bool first) {
  __m256 acc[MT][2];
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 2; ++h) acc[t][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + t * ldy + 8 * h);
  for (int64_t k = 0; k < kc; ++k, wt += 16) {
    const __m256 w0 = _mm256_load_ps(wt), w1 = _mm256_load_ps(wt + 8);
    for (int t = 0; t < MT; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + k);
      acc[t][0] = _mm256_fmadd_ps(w0, xb, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, xb, acc[t][1]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + t * ldy + 8 * h, acc[t][h]);
}
#endif

// y [M, N] = x [M, K] @ W^T in fp32, row blocks rb_begin .. rb_end of W. A last row block short of 16 outputs sums
// into a tile of its own first.
template <int Bits, bool KS>
void fgemm_rows(const uint8_t* w, const at::Half* dm, const float* x, int64_t M, int64_t K, int64_t group, int64_t N,
                float* y, int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * Bits / 8, halves = scale_halves(Bits, K, group, KS);
  Tensor wt_ = at::empty({FG * FKC * 16}, at::kFloat);  // 64-byte aligned: ftile's aligned loads
  float* wt = wt_.data_ptr<float>();
  const bool short_block = rb_end * 16 > N;
  std::vector<float> tail(short_block ? M * 16 : 0);
  for (int64_t rb0 = rb_begin; rb0 < rb_end; rb0 += FG) {
    const int64_t nblk = std::min(FG, rb_end - rb0);
    for (int64_t k0 = 0; k0 < K; k0 += FKC) {
      const int64_t kc = std::min(FKC, K - k0);
      for (int64_t i = 0; i < nblk; ++i)
        widen_f32<Bits, KS>(w + (rb0 + i) * line_bytes, dm + (rb0 + i) * halves, K, group, k0, kc,
                            wt + i * kc * 16);
      token_passes<FT>(M, [&](int64_t m, auto tokens) {
        constexpr int MT = decltype(tokens)::value;
        float* yb[FG];  // each block's outputs for these rows, and their row stride
        int64_t ld[FG];
        for (int64_t i = 0; i < nblk; ++i) {
          const int64_t n0 = (rb0 + i) * 16;
          const bool own = n0 + 16 > N;
          yb[i] = own ? tail.data() + m * 16 : y + m * N + n0;
          ld[i] = own ? 16 : N;
        }
        const float* xm = x + m * K + k0;
#if MIAOTUI_VNNI
        switch (nblk) {
          case 1: ftile16<MT, 1>(xm, K, wt, kc, yb, ld, k0 == 0); break;
          case 2: ftile16<MT, 2>(xm, K, wt, kc, yb, ld, k0 == 0); break;
          case 3: ftile16<MT, 3>(xm, K, wt, kc, yb, ld, k0 == 0); break;
          default: ftile16<MT, 4>(xm, K, wt, kc, yb, ld, k0 == 0); break;
        }
#else
        for (int64_t i = 0; i < nblk; ++i) ftile<MT>(xm, K, wt + i * kc * 16, kc, yb[i], ld[i], k0 == 0);
#endif
      });
    }
  }
  if (short_block)
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(y + m * N + (rb_end - 1) * 16, tail.data() + m * 16, (N - (rb_end - 1) * 16) * sizeof(float));
}
#endif

// y = x @ W^T for prefill-sized M, a chunk of W's rows at a time.
Tensor dense_qmatmul(const Tensor& x, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t N,
                     const Tensor& in_scale, bool ks) {
  const int64_t K = x.size(-1), M = x.numel() / K, rblocks = (N + 15) / 16;
  Tensor xf = x.reshape({M, K}).to(at::kFloat);
  if (in_scale.defined()) xf = xf.mul(in_scale.to(at::kFloat));
  Tensor y = at::empty({M, N}, xf.options());
#if MIAOTUI_AVX2 || MIAOTUI_VNNI
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* dp = scales_of(dm);
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (rblocks + FG - 1) / FG, 1, [&](int64_t g0, int64_t g1) {
    const int64_t b0 = g0 * FG, b1 = std::min(rblocks, g1 * FG);
    if (bits == 6) fgemm_rows<6, false>(wp, dp, xp, M, K, group, N, yp, b0, b1);
    else if (bits == 8) fgemm_rows<8, false>(wp, dp, xp, M, K, group, N, yp, b0, b1);
    else if (ks) fgemm_rows<4, true>(wp, dp, xp, M, K, group, N, yp, b0, b1);
    else fgemm_rows<4, false>(wp, dp, xp, M, K, group, N, yp, b0, b1);
  });
#else
  const int64_t chunk = std::max<int64_t>(1, DENSE_CHUNK_ELEMS / (16 * K));  // row blocks per chunk
  Tensor wf = at::empty({std::min(rblocks, chunk) * 16, K}, xf.options());
  for (int64_t rb = 0; rb < rblocks; rb += chunk) {
    const int64_t rb_end = std::min(rblocks, rb + chunk), n0 = rb * 16, n = std::min(N, rb_end * 16) - n0;
    if (bits == 4) dequantize_rows<4>(w.data_ptr<uint8_t>(), scales_of(dm), K, group, rb, rb_end, N,
                                      wf.data_ptr<float>(), ks);
    else dequantize_rows<8>(w.data_ptr<uint8_t>(), scales_of(dm), K, group, rb, rb_end, N, wf.data_ptr<float>(),
                            false);
    if (n == N) at::mm_out(y, xf, wf.narrow(0, 0, n).t());  // one chunk: straight into y, no copy
    else y.narrow(1, n0, n).copy_(at::mm(xf, wf.narrow(0, 0, n).t()));
  }
#endif
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

#if MIAOTUI_VNNI
// Prefill-sized products on a CPU that multiplies bf16 itself (`vdpbf16ps`, AVX512-BF16, with VBMI's `vpermb`: Zen
// 4/5; an AMX build takes its tile path first): each thread widens the weight's rows 32 at a time to bf16 in L2 (the
// AMX path's widening) and passes every activation row over them, 32 multiply-adds an instruction where the integer
// path above, with its two activation terms, gets 32 per `vpdpbusd` pair and pays per row and block for quantizing
// and rescaling. The result is x @ bf16(d * q + m)^T, as the AMX path and a dense bf16 weight give. It replaced
// widening a chunk of rows to memory for torch's bf16 GEMM (oneDNN): Qwen2.5-1.5B's products at 512 rows 1.03-1.07x
// on the kernel alone, a whole 512-token Qwen2.5-1.5B prompt 1.12x (Zen 4, 2 threads; oneDNN also packed each
// widened chunk into its own layout, a second pass over it). These functions are compiled for those units within
// the AVX-512 build and taken after a run-time check, so the build still runs on AVX-512 CPUs without them.

// From this many rows on (measured on Zen 4, 16 to 128 rows, Qwen2.5-1.5B's gate|up and down, the two paths
// alternated): the integer kernel is faster below 64 rows (1.7x at 16, 1.2x at 32), level at 64, 0.9-0.95x at 96.
constexpr int64_t BF16_MIN_ROWS = 96;

using dp::bf16_units;

MIAOTUI_BF16_BEGIN

// The weight's 16 rows starting at `w` as bf16 lines for `vdpbf16ps` (and tiles for AMX's `tdpbf16ps`): per block of
// 32 inputs, 16 lines of 64 bytes, line p holding inputs 2p and 2p+1 of each of the 16 rows.
template <int Bits, bool KS = false>
void widen_rows(const uint8_t* w, const at::Half* dm, int64_t K, int64_t group, at::BFloat16* out) {
  // A 64-byte line of 16 rows x 4 codes (inputs 4j..4j+3) becomes two bf16 lines, pairs (0,1) then (2,3), each
  // from two 16-lane fp32 vectors (rows 0-7, rows 8-15); sel[v] moves each code into the low byte of its lane.
  alignas(64) static uint8_t sel_idx[4][64];
  static const bool sel_ready = [] {
    for (int v = 0; v < 4; ++v)  // v = 2 * pair + half
      for (int i = 0; i < 16; ++i) sel_idx[v][4 * i] = 4 * ((v % 2) * 8 + i / 2) + (v / 2) * 2 + i % 2;
    return true;
  }();
  (void)sel_ready;
  __m512i sel[4];
  for (int v = 0; v < 4; ++v) sel[v] = _mm512_load_si512(sel_idx[v]);
  const __mmask64 low_bytes = 0x1111111111111111ULL;
  const __m512i lo8 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi8 = _mm512_add_epi32(lo8, _mm512_set1_epi32(8));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 d[2], m[2];
  auto widen = [&](__m512i quad, __m512i* dst) {
    for (int pair = 0; pair < 2; ++pair) {
      __m512 a = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(low_bytes, sel[2 * pair], quad));
      __m512 b = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(low_bytes, sel[2 * pair + 1], quad));
      a = _mm512_fmadd_ps(a, d[0], m[0]);
      b = _mm512_fmadd_ps(b, d[1], m[1]);
      _mm512_storeu_si512(dst + pair, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  };
  __m512i* o = reinterpret_cast<__m512i*>(out);
  if constexpr (Bits == 6) {  // per 16 inputs: four 8-bit lines, w = D s q - 32 D s
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(dm);
    for (int64_t h = 0; h < K / 16; ++h, w += 192, o += 8) {
      const __m512 dv = scales6(sb + h / 16 * 288, h % 16), mv = _mm512_mul_ps(dv, _mm512_set1_ps(-32.f));
      d[0] = _mm512_permutexvar_ps(lo8, dv), d[1] = _mm512_permutexvar_ps(hi8, dv);
      m[0] = _mm512_permutexvar_ps(lo8, mv), m[1] = _mm512_permutexvar_ps(hi8, mv);
      for (int l = 0; l < 3; ++l) _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH + 64 * l, _MM_HINT_T0);
      __m512i v[4];
      unpack6(w, v);
      for (int p = 0; p < 4; ++p) widen(v[p], o + 2 * p);
    }
    return;
  }
  for (int64_t b = 0; b < K / QBLOCK; ++b) {
    if (b * QBLOCK % group == 0) {
      __m512 dv, mv;
      group_scales<KS>(dm, b * QBLOCK / group, dv, mv);
      d[0] = _mm512_permutexvar_ps(lo8, dv), d[1] = _mm512_permutexvar_ps(hi8, dv);
      m[0] = _mm512_permutexvar_ps(lo8, mv), m[1] = _mm512_permutexvar_ps(hi8, mv);
    }
    if (Bits == 4) {
      for (int c = 0; c < 4; ++c, w += 64, o += 4) {
        const __m512i line = _mm512_loadu_si512(w);
        _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH, _MM_HINT_T0);
        widen(_mm512_and_si512(line, low4), o);
        widen(_mm512_and_si512(_mm512_srli_epi16(line, 4), low4), o + 2);
      }
    } else {
      for (int c = 0; c < 8; ++c, w += 64, o += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH, _MM_HINT_T0);
        widen(_mm512_loadu_si512(w), o);
      }
    }
  }
}

// y [M, N] = x [M, K] (bf16) @ bf16(d * q + m)^T: each thread widens a strip pair (32 outputs x K, in L2) once and
// passes every tile of rows over it; the weight is never held widened whole.
void dp_gemm(const uint8_t* w, const at::Half* dm, int bits, bool ks, const at::BFloat16* x, int64_t M, int64_t K,
             int64_t group, int64_t N, at::BFloat16* y) {
  const int64_t line_bytes = 16 * K * bits / 8, rblocks = (N + 15) / 16, tiles = (M + dp::ROWS - 1) / dp::ROWS;
  Tensor xt_ = at::empty({tiles * (K / 2) * dp::ROWS}, at::kInt);
  int32_t* xt = xt_.data_ptr<int32_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      dp::pack_tile(x + t * dp::ROWS * K, K, std::min<int64_t>(dp::ROWS, M - t * dp::ROWS), K,
                    xt + t * (K / 2) * dp::ROWS);
  });
  at::parallel_for(0, (rblocks + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    Tensor buf_ = at::empty({32 * K}, at::kBFloat16);  // 64-byte aligned: whole-line loads
    at::BFloat16* buf = buf_.data_ptr<at::BFloat16>();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t strips = std::min<int64_t>(2, rblocks - 2 * p);
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t rb = 2 * p + s;
        const uint8_t* wl = w + rb * line_bytes;
        const at::Half* dmb = dm + rb * scale_halves(bits, K, group, ks);
        if (bits == 4 && ks) widen_rows<4, true>(wl, dmb, K, group, buf + s * 16 * K);
        else if (bits == 4) widen_rows<4>(wl, dmb, K, group, buf + s * 16 * K);
        else if (bits == 6) widen_rows<6>(wl, dmb, K, group, buf + s * 16 * K);
        else widen_rows<8>(wl, dmb, K, group, buf + s * 16 * K);
      }
      const at::BFloat16* w1 = buf + (strips - 1) * 16 * K;  // a lone last strip pairs with itself
      const int64_t n0 = 32 * p, cols = std::min<int64_t>(32, N - n0);
      for (int64_t t = 0; t < tiles; ++t)
        dp::tile(xt + t * (K / 2) * dp::ROWS, K, buf, w1, y + t * dp::ROWS * N,
                 std::min<int64_t>(dp::ROWS, M - t * dp::ROWS), N, n0, cols);
    }
  });
}

MIAOTUI_BF16_END

// y = x @ W^T for bf16 x of prefill size (in_scale applied first, as the integer path does).
Tensor bf16_qmatmul(const Tensor& x, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t N,
                    const Tensor& in_scale, bool ks) {
  const int64_t K = x.size(-1), M = x.numel() / K;
  Tensor xb = x.reshape({M, K});
  if (in_scale.defined()) xb = xb.to(at::kFloat).mul(in_scale.to(at::kFloat)).to(at::kBFloat16);
  xb = xb.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
  dp_gemm(w.data_ptr<uint8_t>(), scales_of(dm), static_cast<int>(bits), ks, xb.data_ptr<at::BFloat16>(), M, K, group,
          N, y.data_ptr<at::BFloat16>());
  return y;
}
#endif

#if !MIAOTUI_VNNI && !MIAOTUI_AVX2
// Portable C++ (ARM, other CPUs): each line's codes unpacked to bytes once, then plain integer loops over the 16
// rows that the compiler vectorizes; the same integer sums as the VNNI kernel.
template <int Bits, typename T>
void qgemm_rows(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                int64_t N, T* y, int64_t rb_begin, int64_t rb_end, bool ks) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group, nb = K / QBLOCK;
  constexpr int chunks = Bits == 4 ? 4 : 8, per_chunk = QBLOCK / chunks;  // inputs per line
  std::vector<uint8_t> codes(16 * QBLOCK);  // one block of 32 inputs: [input][row]
  std::vector<float> acc(16 * M);
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    const uint8_t* wb = w + rb * line_bytes;
    const at::Half* dmb = dm + rb * scale_halves(Bits, K, group, ks);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < ngroups; ++g) {
      float fd[16 * 64];
      for (int64_t m0 = 0; m0 < M; m0 += 64) {  // tokens in chunks whose fd fits the stack
        const int64_t mc = std::min<int64_t>(64, M - m0);
        std::fill(fd, fd + 16 * mc, 0.f);
        for (int64_t b = g * group / QBLOCK; b < (g + 1) * group / QBLOCK; ++b) {
          const uint8_t* line = wb + b * chunks * 64;
          for (int c = 0; c < chunks; ++c)
            for (int r = 0; r < 16; ++r)
              for (int j = 0; j < 4; ++j) {
                const uint8_t byte = line[c * 64 + r * 4 + j];
                if (Bits == 4) {
                  codes[(c * per_chunk + j) * 16 + r] = byte & 0x0F;
                  codes[(c * per_chunk + j + 4) * 16 + r] = byte >> 4;
                } else {
                  codes[(c * per_chunk + j) * 16 + r] = byte;
                }
              }
          for (int64_t t = 0; t < mc; ++t) {
            const int8_t* xq = x.q.data() + (m0 + t) * K + b * QBLOCK;
            const int8_t* xr = x.r.data() + (m0 + t) * K + b * QBLOCK;
            int32_t sq[16] = {0}, sr[16] = {0};
            for (int k = 0; k < QBLOCK; ++k)
              for (int r = 0; r < 16; ++r) {
                sq[r] += codes[k * 16 + r] * xq[k];
                sr[r] += codes[k * 16 + r] * xr[k];
              }
            const float unit = x.d[(m0 + t) * nb + b] / RESIDUAL;
            for (int r = 0; r < 16; ++r) fd[t * 16 + r] += static_cast<float>(sq[r] * 256 + sr[r]) * unit;
          }
        }
        float dg[16], mg[16];
        for (int r = 0; r < 16; ++r) row_scales(dmb, ks, g, r, dg[r], mg[r]);
        for (int64_t t = 0; t < mc; ++t) {
          const float gsum = x.gsum[(m0 + t) * ngroups + g];
          for (int r = 0; r < 16; ++r) {
            float& a = acc[(m0 + t) * 16 + r];
            a += fd[t * 16 + r] * dg[r];
            a += mg[r] * gsum;
          }
        }
      }
    }
    const int64_t rows = std::min<int64_t>(16, N - rb * 16);
    for (int64_t t = 0; t < M; ++t) store_row(y + t * N + rb * 16, rows, acc.data() + t * 16);
  }
}
#endif

// The definition, in plain C++, one output at a time: every class's kernel is tested against it (`reference=True`).
template <int Bits, typename T>
void qgemm_rows_ref(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                    int64_t N, T* y, int64_t rb_begin, int64_t rb_end, bool ks) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group, nb = K / QBLOCK;
  if constexpr (Bits == 6) {  // y = Σ_groups D s (xd Σ q (x_q + x_r / 256) - 32 Σ x)
    const uint8_t* sc = reinterpret_cast<const uint8_t*>(dm);
    for (int64_t rb = rb_begin; rb < rb_end; ++rb)
      for (int r = 0; r < 16 && rb * 16 + r < N; ++r)
        for (int64_t m = 0; m < M; ++m) {
          float acc = 0.f;
          for (int64_t k0 = 0; k0 < K; k0 += 16) {
            int32_t isum = 0;
            for (int64_t k = k0; k < k0 + 16; ++k)
              isum += code6(w + rb * line_bytes, k, r) *
                      (x.q[m * K + k] * static_cast<int32_t>(RESIDUAL) + x.r[m * K + k]);
            const float part = static_cast<float>(isum) * (x.d[m * nb + k0 / QBLOCK] / RESIDUAL) -
                               32.f * x.gsum[m * (K / 16) + k0 / 16];
            acc += part * scale6(sc + rb * K / 256 * 288, k0, r);
          }
          y[m * N + rb * 16 + r] = static_cast<T>(acc);
        }
    return;
  }
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    for (int64_t r = 0; r < 16 && rb * 16 + r < N; ++r) {
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int64_t g = 0; g < ngroups; ++g) {
          float fd = 0.f;
          for (int64_t b = g * group / QBLOCK; b < (g + 1) * group / QBLOCK; ++b) {
            int32_t isum = 0;
            for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK; ++k) {
              int32_t code;
              if (Bits == 4) {
                int64_t chunk = k / 8, j = k % 8;
                uint8_t byte = w[rb * line_bytes + chunk * 64 + r * 4 + (j % 4)];
                code = j < 4 ? (byte & 0x0F) : (byte >> 4);
              } else {
                code = w[rb * line_bytes + (k / 4) * 64 + r * 4 + k % 4];
              }
              isum += code * (x.q[m * K + k] * static_cast<int32_t>(RESIDUAL) + x.r[m * K + k]);
            }
            fd += static_cast<float>(isum) * (x.d[m * nb + b] / RESIDUAL);
          }
          float d, mg;
          row_scales(dm + rb * scale_halves(Bits, K, group, ks), ks, g, static_cast<int>(r), d, mg);
          acc += fd * d + mg * x.gsum[m * ngroups + g];
        }
        y[m * N + rb * 16 + r] = static_cast<T>(acc);
      }
    }
  }
}

#if MIAOTUI_AMX
// Many rows (prefill, batched decode): the weight is widened to bf16 16 rows at a time, in L2, and multiplied on
// the AMX tile unit (`tdpbf16ps`, fp32 accumulation), with bf16 activations as they come. Unpacking costs the same
// whatever the number of rows, where the integer path above pays per row and block (quantizing, two dot products,
// rescaling), so from AMX_MIN_ROWS rows on this is the faster path; and it holds no dense copy of the weight.
// The result is x @ bf16(d * q + m)^T: what a dense bf16 weight gives.
constexpr int64_t AMX_MIN_ROWS = 8;

// Linux hands out the tile registers' state only on request, once per process.
bool amx_ready() {
  static const bool ok = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

void amx_configure() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1: every tile 16 rows x 64 bytes
  for (int t = 0; t < 8; ++t) {
    reinterpret_cast<uint16_t*>(cfg + 16)[t] = 64;
    cfg[48 + t] = 16;
  }
  _tile_loadconfig(cfg);
}

// 16 * NT tokens (NT = 1 or 2) x 32 outputs (two bf16 strips w0, w1): weights in tmm0/1, activations in tmm2/3,
// accumulators tmm4..7, so every tile load feeds two products and four accumulations run side by side (the tile
// unit has no register renaming: one accumulator in a chain waits out each product's latency).
// out: [NT][2 strips][16 tokens][16 outputs] fp32. `pf`: two strips to pull into L2 meanwhile (or nullptr): tile
// loads are not prefetched by the hardware, and from memory they run at a quarter of the speed they run from L2.
template <int NT>
inline void amx_tiles(const at::BFloat16* x, const at::BFloat16* w0, const at::BFloat16* w1, int64_t K, float* out,
                      const char* pf) {
  _tile_zero(4);
  _tile_zero(5);
  if constexpr (NT > 1) {
    _tile_zero(6);
    _tile_zero(7);
  }
  for (int64_t b = 0; b < K / QBLOCK; ++b) {
    if (pf)
      for (int i = 0; i < 1024; i += 64) {
        _mm_prefetch(pf + b * 1024 + i, _MM_HINT_T1);
        _mm_prefetch(pf + 32 * K + b * 1024 + i, _MM_HINT_T1);
      }
    const at::BFloat16* xb = x + b * 512;
    _tile_loadd(2, xb, 64);
    _tile_loadd(0, w0 + b * 512, 64);
    _tile_loadd(1, w1 + b * 512, 64);
    _tile_dpbf16ps(4, 2, 0);
    _tile_dpbf16ps(5, 2, 1);
    if constexpr (NT > 1) {
      _tile_loadd(3, xb + 16 * K, 64);
      _tile_dpbf16ps(6, 3, 0);
      _tile_dpbf16ps(7, 3, 1);
    }
  }
  _tile_stored(4, out, 64);
  _tile_stored(5, out + 256, 64);
  if constexpr (NT > 1) {
    _tile_stored(6, out + 512, 64);
    _tile_stored(7, out + 768, 64);
  }
}

inline void store_out(float* y, int64_t n, const float* v) { std::memcpy(y, v, n * sizeof(float)); }
inline void store_out(at::BFloat16* y, int64_t n, const float* v) {  // round to nearest even, as at::BFloat16
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v));
  _mm256_mask_storeu_epi16(y, static_cast<__mmask16>((1u << n) - 1), b);
}

// y [M, N] = x @ W^T on the tile unit, x in tile order (amx_rows), W one pair of 16-output strips at a time:
// `panel(p, buf)` returns strip pair p as bf16 tiles (2 x 16 x K, either strip's blocks of 32 inputs in order),
// widening into `buf` (32 x K) if it must; `ahead(p)` the bytes of a later pair to prefetch, or nullptr. The rows go
// in chunks of `chunk` tiles, kept in L2 while every strip pair of this thread passes over them.
template <typename T, typename Panel, typename Ahead>
void amx_loop(const at::BFloat16* x, int64_t M, int64_t K, int64_t N, T* y, int64_t chunk, Panel&& panel,
              Ahead&& ahead) {
  const int64_t tiles = (M + 15) / 16, rblocks = (N + 15) / 16;
  at::parallel_for(0, (rblocks + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    amx_configure();
    Tensor buf = at::empty({32 * K}, at::kBFloat16);  // 64-byte aligned: a tile row split over two lines loads
    alignas(64) float out[1024];                      // at half speed (seen here as 2x run-to-run swings)
    for (int64_t c0 = 0; c0 < tiles; c0 += chunk) {
      const int64_t c1 = std::min(tiles, c0 + chunk);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t strips = std::min<int64_t>(2, rblocks - 2 * p);
        const at::BFloat16* w0 = panel(p, buf.data_ptr<at::BFloat16>());
        const at::BFloat16* w1 = w0 + (strips - 1) * 16 * K;  // a lone last strip pairs with itself
        const char* pf = p + 1 < p1 ? ahead(p + 1) : nullptr;
        for (int64_t t0 = c0; t0 < c1; t0 += 2) {
          const int nt = c1 - t0 >= 2 ? 2 : 1;
          if (nt == 2) amx_tiles<2>(x + t0 * 16 * K, w0, w1, K, out, t0 == c0 ? pf : nullptr);
          else amx_tiles<1>(x + t0 * 16 * K, w0, w1, K, out, t0 == c0 ? pf : nullptr);
          for (int t = 0; t < nt; ++t)
            for (int64_t s = 0; s < strips; ++s) {
              const int64_t rb = 2 * p + s, cols = std::min<int64_t>(16, N - rb * 16);
              for (int64_t r = 0; r < 16 && (t0 + t) * 16 + r < M; ++r)
                store_out(y + ((t0 + t) * 16 + r) * N + rb * 16, cols, out + (t * 2 + s) * 256 + r * 16);
            }
        }
      }
    }
    _tile_release();
  });
}

// Packed codes: each strip pair is widened once, then meets every row.
template <typename T>
void amx_gemm(const uint8_t* w, const at::Half* dm, int bits, bool ks, const at::BFloat16* x, int64_t M, int64_t K,
              int64_t group, int64_t N, T* y) {
  const int64_t line_bytes = 16 * K * bits / 8, rblocks = (N + 15) / 16;
  auto panel = [&](int64_t p, at::BFloat16* buf) -> const at::BFloat16* {
    for (int64_t s = 0; s < std::min<int64_t>(2, rblocks - 2 * p); ++s) {
      const int64_t rb = 2 * p + s;
      const at::Half* dmb = dm + rb * scale_halves(bits, K, group, ks);
      if (bits == 4 && ks) widen_rows<4, true>(w + rb * line_bytes, dmb, K, group, buf + s * 16 * K);
      else if (bits == 4) widen_rows<4>(w + rb * line_bytes, dmb, K, group, buf + s * 16 * K);
      else if (bits == 6) widen_rows<6>(w + rb * line_bytes, dmb, K, group, buf + s * 16 * K);
      else widen_rows<8>(w + rb * line_bytes, dmb, K, group, buf + s * 16 * K);
    }
    return buf;
  };
  amx_loop(x, M, K, N, y, (M + 15) / 16, panel, [](int64_t) -> const char* { return nullptr; });
}

// A bf16 weight kept in tile order: nothing to widen, the strips stream from memory (at the machine's read
// bandwidth from 1 to 32 rows), prefetched a pair ahead; at prefill sizes level with oneDNN.
constexpr int64_t TILE_CHUNK = 32;  // 512 rows: 0.6 MB of activations at K = 576, 1.5 MB at 1536

template <typename T>
void amx_gemm_tiles(const at::BFloat16* wt, const at::BFloat16* x, int64_t M, int64_t K, int64_t N, T* y) {
  const int64_t rblocks = (N + 15) / 16;
  auto panel = [&](int64_t p, at::BFloat16*) { return wt + 2 * p * 16 * K; };
  auto ahead = [&](int64_t p) -> const char* {
    return 2 * p + 1 < rblocks ? reinterpret_cast<const char*>(wt + 2 * p * 16 * K) : nullptr;
  };
  amx_loop(x, M, K, N, y, TILE_CHUNK, panel, ahead);
}

// The activations as bf16 in the tiles' order, [16-row tile][block of 32 inputs][16 rows][32] (1 KB per tile,
// read with unit stride: ~10% faster than strided rows), rows padded with zeros; times in_scale first when given.
// One 64-byte line per (row, block): done element by element this took a quarter of a batch-32 product.
template <typename T, typename S>
Tensor amx_rows(const T* x, const S* in_scale, int64_t M, int64_t K) {
  Tensor out_ = at::empty({(M + 15) / 16 * 16 * K}, at::kBFloat16);  // aligned, as the weight tiles
  at::BFloat16* out = out_.data_ptr<at::BFloat16>();
  if (M % 16) {  // the last tile's rows past M: zero only those (zeroing all of x took ~4% of a prefill)
    const int64_t t = M / 16 * 16 * K;
    for (int64_t k = 0; k < K; k += QBLOCK)
      for (int64_t m = M % 16; m < 16; ++m)
        std::memset(out + t + k * 16 + m * QBLOCK, 0, QBLOCK * sizeof(at::BFloat16));
  }
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      at::BFloat16* o = out + m / 16 * 16 * K + m % 16 * QBLOCK;
      for (int64_t k = 0; k < K; k += QBLOCK, o += 512) {
        const T* src = x + m * K + k;
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          if (!in_scale) {
            std::memcpy(o, src, QBLOCK * sizeof(at::BFloat16));
            continue;
          }
        }
        __m512 lo = mt::load(src).v, hi = mt::load(src + 16).v;
        if (in_scale) {
          lo = _mm512_mul_ps(lo, mt::load(in_scale + k).v);
          hi = _mm512_mul_ps(hi, mt::load(in_scale + k + 16).v);
        }
        _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // round to nearest even, as at::BFloat16
      }
    }
  });
  return out_;
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// GGUF blocks straight into the packed layout, for loading: no float detour, no torch ops per tensor. Each block
// type decodes one group of 32 weights into unsigned codes with w = d * q + m (the layout's fp16 d and m).
enum class BlockType { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K };

// Group g (of 32 inputs) of one row's blocks -> codes q[32], d, m (K-quants: decode_q4k, decode_q6k, a
// super-block at a time).
inline void decode_group(BlockType t, const uint8_t* row, int64_t g, uint8_t* q, float& d, float& m) {
  switch (t) {
    case BlockType::Q4_0: case BlockType::Q4_1: {
      const bool affine = t == BlockType::Q4_1;
      const uint8_t* b = row + g * (affine ? 20 : 18);
      d = f16(b);
      m = affine ? f16(b + 2) : -8.f * d;
      const uint8_t* qs = b + (affine ? 4 : 2);
      for (int i = 0; i < 16; ++i) q[i] = qs[i] & 0x0F, q[i + 16] = qs[i] >> 4;
      return;
    }
    case BlockType::Q5_0: case BlockType::Q5_1: {
      const bool affine = t == BlockType::Q5_1;
      const uint8_t* b = row + g * (affine ? 24 : 22);
      d = f16(b);
      m = affine ? f16(b + 2) : -16.f * d;
      uint32_t qh;
      std::memcpy(&qh, b + (affine ? 4 : 2), 4);
      const uint8_t* qs = b + (affine ? 8 : 6);
      for (int i = 0; i < 16; ++i) {
        q[i] = (qs[i] & 0x0F) | (((qh >> i) & 1) << 4);
        q[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
      }
      return;
    }
    case BlockType::Q8_0: {
      const uint8_t* b = row + g * 34;
      d = f16(b);
      m = -128.f * d;
      for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(static_cast<int8_t>(b[2 + i]) + 128);
      return;
    }
    case BlockType::Q4_K: case BlockType::Q6_K:
      break;  // whole super-blocks at a time: decode_q4k, decode_q6k
  }
}

// A Q4_K super-block's 8 groups' 6-bit scales and mins, from its 12 packed bytes.
inline void q4k_scales(const uint8_t* b, uint8_t* scale, uint8_t* mn) {
  const uint8_t* sc = b + 4;
  for (int j = 0; j < 8; ++j) {
    scale[j] = static_cast<uint8_t>(j < 4 ? sc[j] & 63 : (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4));
    mn[j] = static_cast<uint8_t>(j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4));
  }
}

// One Q4_K super-block (256 weights: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles) -> its 8
// groups of 32 as 4-bit codes with their d and m (w = d * scale * q - dmin * min; the layout rounds d and m to fp16).
inline void decode_q4k(const uint8_t* b, uint8_t* q, float* d, float* m) {
  const float dd = f16(b), dmin = f16(b + 2);
  uint8_t scale[8], mn[8];
  q4k_scales(b, scale, mn);
  for (int j = 0; j < 8; ++j) {
    d[j] = dd * static_cast<float>(scale[j]);
    m[j] = -dmin * static_cast<float>(mn[j]);
  }
  for (int p = 0; p < 4; ++p) {  // 32 bytes of nibbles: group 2p in the low ones, 2p + 1 in the high
    const uint8_t* qs = b + 16 + p * 32;
    for (int i = 0; i < 32; ++i) q[p * 64 + i] = qs[i] & 0x0F, q[p * 64 + 32 + i] = qs[i] >> 4;
  }
}

// One Q6_K super-block's codes less 32 (-32..31), in weight order: 128 bytes of low nibbles, then 64 of high bits.
inline void q6k_codes(const uint8_t* b, int8_t* c6) {
  for (int half = 0; half < 2; ++half)
    for (int part = 0; part < 4; ++part) {  // 4 groups of 32 per half of 128
      const uint8_t* ql = b + half * 64 + (part & 1) * 32;
      const uint8_t* qh = b + 128 + half * 32;
      const int shift = (part >> 1) * 4, hshift = 2 * part;
      int8_t* c = c6 + (half * 4 + part) * 32;
      for (int i = 0; i < 32; ++i)
        c[i] = static_cast<int8_t>((((ql[i] >> shift) & 0x0F) | (((qh[i] >> hshift) & 3) << 4)) - 32);
    }
}

// One Q6_K super-block (256 weights: 128 bytes of low nibbles, 64 of high bits, 16 int8 scales of 16 weights, d)
// -> its 8 groups of 32 as 8-bit codes with their d and m. Q6_K has no exact 8-bit form: each group is requantized
// to 255 levels of its largest weight. The 8 groups are decoded in passes (values, then steps, then codes) so that
// their latency chains (a horizontal max, the step's rounding to fp16, the divisions) overlap.
inline void decode_q6k(const uint8_t* b, uint8_t* q, float* d, float* m) {
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float dd = f16(b + 208);
  alignas(64) int8_t c6[256];  // the codes less 32, in weight order
  q6k_codes(b, c6);
  constexpr int NV = 32 / mt::W;
  alignas(64) float v[256], step[8];
  for (int g = 0; g < 8; ++g) {
    mt::Vec vmax = mt::zero();
    for (int h = 0; h < NV; ++h) {  // each weight times its sub-block's scale, as dequantization computes it
      const int i = g * 32 + mt::W * h;
      const mt::Vec x = mt::load(c6 + i) * mt::set1(dd * sc[i / 16]);
      mt::store(v + i, x);
      vmax = mt::vmax(vmax, mt::vabs(x));
    }
    const float amax = mt::reduce_max(vmax);
    // the step rounded to fp16 (up, so no code passes 127; at least fp16's smallest normal)
    step[g] = static_cast<float>(c10::Half(std::max(amax / 127.f, 6.2e-5f) * (1.f + 1.f / 1024)));
  }
  const mt::Vec top = mt::set1(127.f), bottom = mt::set1(-127.f), mid = mt::set1(128.f);
  for (int g = 0; g < 8; ++g) {
    const mt::Vec vs = mt::set1(step[g]);
    for (int h = 0; h < NV; ++h) {  // the codes as bytes with 128 added (exact in float)
      const int i = g * 32 + mt::W * h;
      mt::store_u8(q + i, mt::vround(mt::vmax(bottom, mt::vmin(top, mt::load(v + i) / vs))) + mid);
    }
    d[g] = step[g];
    m[g] = -128.f * step[g];
  }
}

// A row's groups (K / 32 of them) -> codes q[K], d and m per group.
inline void decode_row(BlockType t, const uint8_t* row, int64_t ngroups, uint8_t* q, float* d, float* m) {
  if (t == BlockType::Q4_K || t == BlockType::Q6_K) {
    for (int64_t s = 0; s < ngroups / 8; ++s)
      if (t == BlockType::Q4_K) decode_q4k(row + s * 144, q + s * 256, d + s * 8, m + s * 8);
      else decode_q6k(row + s * 210, q + s * 256, d + s * 8, m + s * 8);
    return;
  }
  for (int64_t g = 0; g < ngroups; ++g) decode_group(t, row, g, q + g * QBLOCK, d[g], m[g]);
}

BlockType block_type(const std::string& name, int64_t& block_bytes, int64_t& block_weights, int& bits) {
  static const struct { const char* name; BlockType t; int64_t bytes, weights; int bits; } types[] = {
      {"Q4_0", BlockType::Q4_0, 18, 32, 4}, {"Q4_1", BlockType::Q4_1, 20, 32, 4}, {"Q5_0", BlockType::Q5_0, 22, 32, 8},
      {"Q5_1", BlockType::Q5_1, 24, 32, 8}, {"Q8_0", BlockType::Q8_0, 34, 32, 8}, {"Q4_K", BlockType::Q4_K, 144, 256, 4},
      {"Q6_K", BlockType::Q6_K, 210, 256, 8}};
  for (const auto& t : types)
    if (name == t.name) {
      block_bytes = t.bytes, block_weights = t.weights, bits = t.bits;
      return t.t;
    }
  TORCH_CHECK(false, "pack_blocks: no packing for block type ", name);
}

}  // namespace

const char* qmatmul_path() { return MIAOTUI_VNNI ? "vnni" : MIAOTUI_AVX2 ? "avx2" : "generic"; }

namespace {
thread_local bool row_exact_ = false;
}  // namespace

bool row_exact() { return row_exact_; }

bool set_row_exact(bool on) { return std::exchange(row_exact_, on); }

bool qmatmul_amx() {
#if MIAOTUI_AMX
  return amx_ready();
#else
  return false;
#endif
}

int64_t qmatmul_fp32_rows(int64_t bits, int64_t group, int64_t act_bits) {
  return fp32_prompts(bits, group, act_bits) ? dense_min_rows(bits) : 0;
}

bool qmatmul_bf16_gemm() {
#if MIAOTUI_VNNI
  return bf16_units() && !qmatmul_amx();
#else
  return false;
#endif
}

// The layout's codes and scales: 4 or 8 bits with fp16 d and m per group of a multiple of 32; 6 bits (VNNI, AVX2)
// with their scale bytes per 16 and 256 inputs.
// Returns whether the scales are Q4_K's bytes (4-bit codes with uint8 scales).
static bool check_layout(const char* op, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && dm.is_contiguous(), op, ": contiguous uint8 codes");
  if (bits == 6) {
    TORCH_CHECK(MIAOTUI_VNNI || MIAOTUI_AVX2, op, ": 6-bit codes need the VNNI or AVX2 build (this one is ",
                qmatmul_path(), ")");
    TORCH_CHECK(dm.scalar_type() == at::kByte && group == 16 && K % 256 == 0,
                op, ": 6-bit codes take uint8 scales, groups of 16 and K in super-blocks of 256");
    return false;
  }
  if (bits == 4 && dm.scalar_type() == at::kByte) {
    TORCH_CHECK(group == QBLOCK && K % 256 == 0, op, ": Q4_K's scales take groups of 32 and K in super-blocks of 256");
    return true;
  }
  TORCH_CHECK(bits == 4 || bits == 8, op, ": 4, 6 or 8 bits");
  TORCH_CHECK(dm.scalar_type() == at::kHalf, op, ": fp16 scales");
  TORCH_CHECK(group % QBLOCK == 0 && K % group == 0, op, ": K must split into groups of a multiple of 32");
  return false;
}

// Rows `ids` of a packed weight as fp32 [n, K]: an embedding lookup (one row per token) without a torch op per step
// of the unpacking (~160 us a token through torch). The same values as dequantize_rows (the same dequantize_word).
Tensor packed_rows(const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t K, const Tensor& ids_) {
  const bool ks = check_layout("packed_rows", w, dm, bits, group, K);
  const Tensor ids = ids_.to(at::kLong).contiguous();
  const int64_t n = ids.numel(), line_bytes = 16 * K * bits / 8;
  const int64_t rows_total = w.numel() / (K * bits / 8);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < rows_total, "packed_rows: row ", id[i], " is outside the weight");
  Tensor out = at::empty({n, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* dp = scales_of(dm);
  float* o = out.data_ptr<float>();
  const int64_t per_line = bits == 4 ? 8 : 4;  // inputs per 64-byte line
  // a token's embedding row, or every row of a weight (hybrid's dense copy): rows in parallel past a few
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t rb = id[i] / 16, r = id[i] % 16;
      if (bits == 6) {
        row6(wp + rb * line_bytes, dm.const_data_ptr<uint8_t>() + rb * K / 256 * 288, K, static_cast<int>(r),
             o + i * K);
        continue;
      }
      const uint8_t* line = wp + rb * line_bytes + r * 4;
      const at::Half* dmb = dp + rb * scale_halves(bits, K, group, ks);
      float* orow = o + i * K;
      for (int64_t c = 0; c < K / per_line; ++c, line += 64) {
        const int64_t k0 = c * per_line, g = k0 / group;
        float d, m;
        row_scales(dmb, ks, g, static_cast<int>(r), d, m);
        uint32_t word;
        std::memcpy(&word, line, 4);
        if (bits == 4) dequantize_word<4>(word, d, m, orow + k0);
        else dequantize_word<8>(word, d, m, orow + k0);
      }
    }
  });
  return out;
}

// Whether the tile path takes a product of M rows (AMX builds, on CPUs that grant the tiles): bf16 activations
// only. Tiles multiply bf16(d q + m) by bf16 rows, so fp32 activations, which ask for fp32's precision, stay on the
// integer kernel (~15 bits of each activation, the codes exact) as on every other class; at fp32 a batch's or a
// speculative check's rows are then the one-row step's.
inline bool amx_takes(int64_t M, const Tensor& x) {
#if MIAOTUI_AMX
  return M >= AMX_MIN_ROWS && x.scalar_type() == at::kBFloat16 && !row_exact() && amx_ready();
#else
  (void)M, (void)x;
  return false;
#endif
}

// y [M, N] = x [M, K] (fp32 or bf16; times in_scale [K] first when given) @ W^T, W packed as described above.
Tensor qmatmul(const Tensor& x_, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t N,
               const c10::optional<Tensor>& in_scale_, bool reference, int64_t act_bits) {
  Tensor x = x_.contiguous();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && dm.device().is_cpu(), "qmatmul: CPU tensors only");
  TORCH_CHECK(act_bits == 16 || act_bits == 8, "qmatmul: activations in 16 bits (two int8 terms) or 8 (one)");
  const int64_t K = x.size(-1), M = x.numel() / K;
  const bool ks = check_layout("qmatmul", w, dm, bits, group, K);
  const int64_t rblocks = (N + 15) / 16;
  TORCH_CHECK(w.numel() == rblocks * 16 * K * bits / 8, "qmatmul: packed weight does not match K and N");
  TORCH_CHECK(dm.numel() * dm.element_size() == rblocks * scale_halves(bits, K, group, ks) * 2,
              "qmatmul: scales do not match K, N and the group");
  Tensor in_scale;
  if (in_scale_.has_value()) {  // taken in its own dtype when fp32 or bf16: no conversion per call
    in_scale = in_scale_->contiguous();
    if (in_scale.scalar_type() != at::kFloat && in_scale.scalar_type() != at::kBFloat16)
      in_scale = in_scale.to(at::kFloat);
    TORCH_CHECK(in_scale.numel() == K, "qmatmul: in_scale must have K elements");
  }
  if (fp32_prompts(bits, group, act_bits) && !reference && M >= dense_min_rows(bits) && !row_exact())
    return dense_qmatmul(x, w, dm, bits, group, N, in_scale, ks);
#if MIAOTUI_VNNI
  if (act_bits == 16 && !reference && x.scalar_type() == at::kBFloat16 && M >= BF16_MIN_ROWS && bf16_units() &&
      !row_exact() && !amx_takes(M, x))
    return bf16_qmatmul(x, w, dm, bits, group, N, in_scale, ks);
#endif
  auto shape = x.sizes().vec();
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
  auto run = [&](auto* xp, auto* yp) {
#if MIAOTUI_AMX
    if (!reference && amx_takes(M, x)) {
      Tensor xb;
      if (!in_scale.defined()) xb = amx_rows(xp, static_cast<const float*>(nullptr), M, K);
      else if (in_scale.scalar_type() == at::kBFloat16) xb = amx_rows(xp, in_scale.data_ptr<at::BFloat16>(), M, K);
      else xb = amx_rows(xp, in_scale.data_ptr<float>(), M, K);
      amx_gemm(w.data_ptr<uint8_t>(), scales_of(dm), bits, ks, xb.data_ptr<at::BFloat16>(), M, K, group, N, yp);
      return;
    }
#endif
    QuantX qx{Scratch<int8_t>(M * K), Scratch<int8_t>(M * K), Scratch<float>(M * K / QBLOCK),
              Scratch<float>(M * K / group)};
    qx.residual = act_bits == 16;
#if MIAOTUI_AVX2
    // (4-bit codes under one term stay on the block kernel: its `vpmaddubsw` passes do twice the int16 kernel's
    // products a cycle; SmolLM2's 32 x (64, 128) at `--activation-bits 8` 1.19x)
    const bool wide = !reference && (bits == 8 || (bits == 4 && qx.residual)) && M >= WIDE_MIN_ROWS;
#else
    const bool wide = false;
#endif
    if (MIAOTUI_AVX2 && (bits == 8 || bits == 6 || wide) && !reference) qx.a.resize(M * K);
    auto quantize = [&](auto* sp) {
      quantize_rows(xp, sp, M, K, group, qx.q.data(), qx.r.data(), qx.d.data(), qx.gsum.data(), qx.residual,
                    qx.a.empty() ? nullptr : qx.a.data());
    };
    if (!in_scale.defined()) quantize(static_cast<const float*>(nullptr));
    else if (in_scale.scalar_type() == at::kBFloat16) quantize(in_scale.data_ptr<at::BFloat16>());
    else quantize(in_scale.data_ptr<float>());
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const at::Half* dp = scales_of(dm);
    at::parallel_for(0, rblocks, 1, [&](int64_t b0, int64_t b1) {
#if MIAOTUI_AVX2
      if (wide) {
        if (bits == 8) qgemm_wide_rows<8, false>(wp, dp, qx, M, K, group, N, yp, b0, b1);
        else if (ks) qgemm_wide_rows<4, true>(wp, dp, qx, M, K, group, N, yp, b0, b1);
        else qgemm_wide_rows<4, false>(wp, dp, qx, M, K, group, N, yp, b0, b1);
        return;
      }
#endif
      if (!reference) {
        if (bits == 4) qgemm_rows<4>(wp, dp, qx, M, K, group, N, yp, b0, b1, ks);
#if MIAOTUI_VNNI || MIAOTUI_AVX2
        else if (bits == 6) qgemm_rows<6>(wp, dp, qx, M, K, group, N, yp, b0, b1, false);
#endif
        else qgemm_rows<8>(wp, dp, qx, M, K, group, N, yp, b0, b1, false);
        return;
      }
      if (bits == 4) qgemm_rows_ref<4>(wp, dp, qx, M, K, group, N, yp, b0, b1, ks);
      else if (bits == 6) qgemm_rows_ref<6>(wp, dp, qx, M, K, group, N, yp, b0, b1, false);
      else qgemm_rows_ref<8>(wp, dp, qx, M, K, group, N, yp, b0, b1, false);
    });
  };
  if (x.scalar_type() == at::kFloat) run(x.data_ptr<float>(), y.data_ptr<float>());
  else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "qmatmul: float32 or bfloat16 activations");
    run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  }
  return y;
}

// y [M, N] = x [M, K] (fp32 or bf16) @ W^T, W a bf16 weight in tile order:
// [N/16 strips][K/32 blocks][16 lines][16 rows x 2 inputs] (line p of a block holds inputs 2p, 2p+1 of each row).
Tensor tile_matmul(const Tensor& x_, const Tensor& tiles, int64_t N) {
  Tensor x = x_.contiguous();
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "tile_matmul: CPU tensors only");
  TORCH_CHECK(tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous(), "tile_matmul: contiguous bf16 tiles");
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK(K % QBLOCK == 0 && tiles.numel() == (N + 15) / 16 * 16 * K, "tile_matmul: tiles do not match K and N");
  auto shape = x.sizes().vec();
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
#if MIAOTUI_AMX
  TORCH_CHECK(amx_ready(), "tile_matmul: no AMX on this CPU");
  const float* none = nullptr;  // no input scale
  const at::BFloat16* wt = tiles.data_ptr<at::BFloat16>();
  if (x.scalar_type() == at::kFloat) {
    Tensor xb = amx_rows(x.data_ptr<float>(), none, M, K);
    amx_gemm_tiles(wt, xb.data_ptr<at::BFloat16>(), M, K, N, y.data_ptr<float>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "tile_matmul: float32 or bfloat16 activations");
    Tensor xb = amx_rows(x.data_ptr<at::BFloat16>(), none, M, K);
    amx_gemm_tiles(wt, xb.data_ptr<at::BFloat16>(), M, K, N, y.data_ptr<at::BFloat16>());
  }
#else
  TORCH_CHECK(false, "tile_matmul: built without AMX");
#endif
  return y;
}

// Q6_K blocks as 6-bit codes, exactly (pack_blocks with 6 bits): a block of 16 rows is decoded a row at a time,
// then written 16 inputs (three lines) at a time; the scales are copied as they are.
static std::tuple<Tensor, Tensor, int64_t> pack_q6k(const Tensor& raw, int64_t N, int64_t K,
                                                    const c10::optional<Tensor>& rows,
                                                    const c10::optional<Tensor>& data_out,
                                                    const c10::optional<Tensor>& dm_out) {
  const int64_t rblocks = (N + 15) / 16, nsb = K / 256;
  Tensor data = data_out ? *data_out : at::empty({rblocks, K * 6 / 32, 16, 4}, raw.options());
  Tensor sc = dm_out ? *dm_out : at::empty({rblocks, nsb, 288}, raw.options());
  TORCH_CHECK(MIAOTUI_VNNI || MIAOTUI_AVX2, "pack_blocks: 6-bit codes need the VNNI or AVX2 build (this one is ",
              qmatmul_path(), ")");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == rblocks * 16 * K * 6 / 8 &&
              sc.scalar_type() == at::kByte && sc.is_contiguous() && sc.numel() == rblocks * nsb * 288,
              "pack_blocks: outputs do not match N, K and 6 bits");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  const int64_t* perm = rows ? rows->data_ptr<int64_t>() : nullptr;
  uint8_t* out = data.data_ptr<uint8_t>();
  uint8_t* sco = sc.data_ptr<uint8_t>();
  at::parallel_for(0, rblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> c(16 * K);  // the block's codes less 32, row by row
    for (int64_t rb = b0; rb < b1; ++rb) {
      uint8_t* sb = sco + rb * nsb * 288;
      for (int r = 0; r < 16; ++r) {
        if (rb * 16 + r >= N) {  // padding rows: zero codes, zero scales
          std::memset(c.data() + r * K, 0, K);
          for (int64_t s = 0; s < nsb; ++s) {
            std::memset(sb + s * 288 + 2 * r, 0, 2);
            for (int g = 0; g < 16; ++g) sb[s * 288 + 32 + g * 16 + r] = 0;
          }
          continue;
        }
        const uint8_t* row = src + (perm ? perm[rb * 16 + r] : rb * 16 + r) * (K / 256 * 210);
        for (int64_t s = 0; s < nsb; ++s) {
          const uint8_t* b = row + s * 210;
          q6k_codes(b, c.data() + r * K + s * 256);
          std::memcpy(sb + s * 288 + 2 * r, b + 208, 2);
          for (int g = 0; g < 16; ++g) sb[s * 288 + 32 + g * 16 + r] = b[192 + g];
        }
      }
      uint8_t* o = out + rb * 16 * K * 6 / 8;
      for (int64_t h = 0; h < K / 16; ++h, o += 192)
        for (int r = 0; r < 16; ++r) {
          const int8_t* cr = c.data() + r * K + h * 16;
          for (int j = 0; j < 4; ++j) {
            int code[4];
            for (int p = 0; p < 4; ++p) code[p] = cr[4 * p + j] + 32;
            o[r * 4 + j] = static_cast<uint8_t>((code[0] & 0x0F) | ((code[1] & 0x0F) << 4));
            o[64 + r * 4 + j] = static_cast<uint8_t>((code[2] & 0x0F) | ((code[3] & 0x0F) << 4));
            o[128 + r * 4 + j] = static_cast<uint8_t>((code[0] >> 4) | ((code[1] >> 4) << 2) | ((code[2] >> 4) << 4) |
                                                      ((code[3] >> 4) << 6));
          }
        }
    }
  });
  return {data, sc, 6};
}

// The packed layout (data, dm) of a GGUF tensor [N, K] of block type `type` from its raw bytes (rows in file order;
// output row r is file row rows[r] when a permutation is given), in `out_bits` (0: the type's own; 4-bit types may
// be written as 8-bit codes, Q6_K as 6-bit ones in VNNI and AVX2 builds; `kscales`: Q4_K with its own scales).
// Written into data_out / dm_out when given (row blocks of a fused projection's layout: its parts land in place, no
// concatenation), else into new tensors. Returns (data, dm, bits).
std::tuple<Tensor, Tensor, int64_t> pack_blocks(const Tensor& raw, const std::string& type, int64_t N, int64_t K,
                                                const c10::optional<Tensor>& rows, int64_t out_bits,
                                                const c10::optional<Tensor>& data_out,
                                                const c10::optional<Tensor>& dm_out, bool kscales) {
  int64_t block_bytes, block_weights;
  int bits;
  const BlockType t = block_type(type, block_bytes, block_weights, bits);
  TORCH_CHECK(out_bits != 6 || t == BlockType::Q6_K, "pack_blocks: only Q6_K packs as 6-bit codes, not ", type);
  TORCH_CHECK(out_bits == 0 || out_bits == 6 || out_bits >= bits, "pack_blocks: ", type, " needs ", bits, " bits");
  if (out_bits) bits = static_cast<int>(out_bits);
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous() && K % block_weights == 0 &&
              raw.numel() == N * K / block_weights * block_bytes, "pack_blocks: raw bytes do not match N, K and ", type);
  TORCH_CHECK(!rows || (rows->scalar_type() == at::kLong && rows->numel() == N), "pack_blocks: one int64 row each");
  const int64_t rblocks = (N + 15) / 16, ngroups = K / QBLOCK, row_bytes = K / block_weights * block_bytes;
  TORCH_CHECK(data_out.has_value() == dm_out.has_value(), "pack_blocks: give both outputs or neither");
  if (bits == 6) return pack_q6k(raw, N, K, rows, data_out, dm_out);
  TORCH_CHECK(!kscales || (t == BlockType::Q4_K && bits == 4), "pack_blocks: only Q4_K keeps its scales, in 4 bits");
  Tensor data = data_out ? *data_out : at::empty({rblocks, K * bits / 32, 16, 4}, raw.options());
  Tensor dm = dm_out ? *dm_out
          : kscales ? at::empty({rblocks, K / 256, 320}, raw.options())
                    : at::empty({rblocks, ngroups, 2, 16}, raw.options().dtype(at::kHalf));
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == rblocks * 16 * K * bits / 8 &&
              dm.scalar_type() == (kscales ? at::kByte : at::kHalf) && dm.is_contiguous() &&
              dm.numel() * dm.element_size() == rblocks * scale_halves(bits, K, QBLOCK, kscales) * 2,
              "pack_blocks: outputs do not match N, K and the bits");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  const int64_t* perm = rows ? rows->data_ptr<int64_t>() : nullptr;
  uint8_t* out = data.data_ptr<uint8_t>();
  at::Half* dmo = kscales ? nullptr : dm.data_ptr<at::Half>();
  uint8_t* kso = kscales ? dm.data_ptr<uint8_t>() : nullptr;
  const int64_t lines = K * bits / 32 / ngroups;  // 64-byte lines per group: 4 (4-bit) or 8
  at::parallel_for(0, rblocks, 1, [&](int64_t b0, int64_t b1) {
    // A block of 16 rows is decoded a row at a time (each row's bytes read in file order: 16 interleaved streams,
    // one group each, left the loads waiting on memory), then its lines written from the decoded codes.
    std::vector<uint8_t> q(16 * K);
    std::vector<float> dq(16 * ngroups), mq(16 * ngroups);
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int rows_here = static_cast<int>(std::min<int64_t>(16, N - rb * 16));
      for (int r = 0; r < 16; ++r) {
        uint8_t* qr = q.data() + r * K;
        float* dr = dq.data() + r * ngroups;
        float* mr = mq.data() + r * ngroups;
        const uint8_t* row = r < rows_here ? src + (perm ? perm[rb * 16 + r] : rb * 16 + r) * row_bytes : nullptr;
        for (int64_t s = 0; kscales && s < K / 256; ++s) {  // Q4_K's own scales: D, -Dmin, then the bytes
          uint8_t* sb = kso + (rb * (K / 256) + s) * 320;
          uint8_t scale[8] = {}, mn[8] = {};
          uint16_t dd = 0, dmin = 0;
          if (row) {
            std::memcpy(&dd, row + s * 144, 2);
            std::memcpy(&dmin, row + s * 144 + 2, 2);
            dmin ^= 0x8000;  // -Dmin: the sign bit
            q4k_scales(row + s * 144, scale, mn);
          }
          std::memcpy(sb + 2 * r, &dd, 2);
          std::memcpy(sb + 32 + 2 * r, &dmin, 2);
          for (int g = 0; g < 8; ++g) sb[64 + g * 16 + r] = scale[g], sb[192 + g * 16 + r] = mn[g];
        }
        if (!row) {  // padding rows: zero codes, zero scales
          std::memset(qr, 0, K);
          std::fill(dr, dr + ngroups, 0.f);
          std::fill(mr, mr + ngroups, 0.f);
          continue;
        }
        decode_row(t, row, ngroups, qr, dr, mr);
      }
      for (int64_t g = 0; g < ngroups; ++g) {  // one group of 16 rows: its scales, then its lines in order
        for (int r = 0; dmo && r < 16; ++r) {
          at::Half* dmg = dmo + (rb * ngroups + g) * 32;
          dmg[r] = at::Half(dq[r * ngroups + g]);
          dmg[16 + r] = at::Half(mq[r * ngroups + g]);
        }
        uint8_t* o = out + (rb * ngroups + g) * lines * 64;
        const uint8_t* qg = q.data() + g * QBLOCK;
        if (bits == 8) {
          for (int c = 0; c < 8; ++c, o += 64)
            for (int r = 0; r < 16; ++r) std::memcpy(o + r * 4, qg + r * K + c * 4, 4);
          continue;
        }
        for (int c = 0; c < 4; ++c, o += 64)
          for (int r = 0; r < 16; ++r) {
            uint64_t eight;  // the line's 8 codes of this row (each < 16): inputs j and j + 4 share byte j
            std::memcpy(&eight, qg + r * K + c * 8, 8);
            const uint32_t word = static_cast<uint32_t>(eight) | (static_cast<uint32_t>(eight >> 32) << 4);
            std::memcpy(o + r * 4, &word, 4);
          }
      }
    }
  });
  return {data, dm, bits};
}
