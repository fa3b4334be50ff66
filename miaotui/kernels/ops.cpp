// miaotui's small CPU ops, each fused into one call: RMSNorm, the gated activation, rotary embedding, the argmax of
// logits rows, decode attention straight over the paged KV cache, and fp32 products of a few rows.
//
// At decode sizes (one to a few tokens of a 576-wide model) every torch op costs microseconds of dispatch and thread
// wake-up for nanoseconds of work: RMSNorm was five ops, rotary embedding six, the gated activation three, and
// decode attention a gather, a mask and SDPA per layer. Written once against vec.h, built per CPU class.

#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "vec.h"

using at::Tensor;
using mt::BF16;
using mt::Vec;
using mt::W;

namespace {

// Run `fn` (a generic lambda) with scalar_t bound to the tensor's float type: fp32 or bf16, the model dtypes.
#define DISPATCH_FLOAT(TYPE, NAME, ...)                                          \
  [&] {                                                                          \
    if ((TYPE) == at::kFloat) {                                                  \
      using scalar_t = float;                                                    \
      return __VA_ARGS__();                                                      \
    }                                                                            \
    TORCH_CHECK((TYPE) == at::kBFloat16, NAME, ": float32 or bfloat16 only");    \
    using scalar_t = BF16;                                                       \
    return __VA_ARGS__();                                                        \
  }()

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, accumulated in fp32, one pass per row.
template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d;
      Vec acc = mt::zero();
      int64_t i = 0;
      for (; i + W <= d; i += W) acc = mt::fmadd(mt::load(xr + i), mt::load(xr + i), acc);
      float ss = mt::reduce_add(acc);
      for (; i < d; ++i) ss += mt::to_f(xr[i]) * mt::to_f(xr[i]);
      const float inv = 1.f / std::sqrt(ss / d + eps);
      const Vec vinv = mt::set1(inv);
      i = 0;
      for (; i + W <= d; i += W) mt::store(y + r * d + i, mt::load(xr + i) * vinv * mt::load(w + i));
      for (; i < d; ++i) y[r * d + i] = mt::from_f<T>(mt::to_f(xr[i]) * inv * mt::to_f(w[i]));
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Gated activations over a fused [gate | up] row: y = act(gate) * up, the activation rounded to T first, as
// torch's unfused `act(gate) * up` does.
template <typename T, bool Gelu>
void gated_impl(const T* x, T* y, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    const Vec one = mt::set1(1.f);
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * 2 * d;
      const T* u = g + d;
      T* yr = y + r * d;
      int64_t i = 0;
      for (; i + W <= d; i += W) {
        const Vec a = mt::load(g + i);
        Vec act;
        if (Gelu) {  // tanh(z) = 1 - 2 / (1 + e^2z)
          const Vec z = mt::set1(0.7978845608028654f) * mt::fmadd(mt::set1(0.044715f) * a, a * a, a);
          const Vec th = one - mt::set1(2.f) / (one + mt::exp(z + z));
          act = mt::set1(0.5f) * a * (one + th);
        } else {
          act = a / (one + mt::exp(mt::zero() - a));
        }
        mt::store(yr + i, mt::round_to(yr, act) * mt::load(u + i));
      }
      for (; i < d; ++i) {
        const float a = mt::to_f(g[i]);
        const float act = Gelu ? 0.5f * a * (1.f + std::tanh(0.7978845608028654f * (a + 0.044715f * a * a * a)))
                               : a / (1.f + std::exp(-a));
        yr[i] = mt::from_f<T>(mt::to_f(mt::from_f<T>(act)) * mt::to_f(u[i]));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Rotary embedding, NEOX layout, in place on x [T, H, D] (rows may be strided, as q|k inside a fused qkv output).
template <typename T>
void rope_impl(T* x, int64_t t_stride, int64_t h_stride, const int64_t* pos, const float* cos, const float* sin,
               int64_t T_, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  at::parallel_for(0, T_ * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / H, h = i % H;
      T* v = x + t * t_stride + h * h_stride;
      const float* c = cos + pos[t] * D;
      const float* s = sin + pos[t] * D;
      for (int64_t j = 0; j < half; ++j) {
        const float a = mt::to_f(v[j]), b = mt::to_f(v[j + half]);
        v[j] = mt::from_f<T>(a * c[j] - b * s[j]);
        v[j + half] = mt::from_f<T>(b * c[j + half] + a * s[j + half]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Decode attention: one query token per sequence, straight over the paged cache, no gather, no mask.
// Work unit = (sequence, kv head), or a span of SPAN keys of one (below): its group of query heads scores the keys,
// softmax, weighted values.

// The cache rows a sequence visits are scattered over its blocks, too irregular for the hardware prefetcher: a
// batch-32 decode step reads ~80 MB of keys and values for SmolLM2, as much as its 4-bit weights. Into L2: perf
// found the loop waiting on the prefetches themselves when they went to L1 (its few fill buffers full).
template <typename C>
inline void prefetch_row(const C* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(C)); b += 64) mt::prefetch_l2(p + b);
}

// scores[g * n + i] = q_g . k(rows[i]) for the G query heads of one kv head, W keys at a time: each key's row is
// read from memory once for all G heads (later heads find it in L1).
template <int V, typename C>
void grouped_scores(const float* q, int64_t G, const C* cache, const int64_t* rows, int64_t n, float* scores) {
  constexpr int64_t D = W * V;
  for (int64_t i0 = 0; i0 < n; i0 += W) {
    const int64_t cnt = std::min<int64_t>(W, n - i0);
    for (int64_t i = i0 ? i0 + 2 * W : W; i < std::min(n, i0 + 3 * W); ++i) prefetch_row(cache + rows[i] * D, D);
    // W keys side by side, a query vector at a time: W independent sums (key by key, each key's V products waited
    // on each other: Qwen2.5's 128-wide heads scored 1.07-1.23x faster so, one thread, keys in L2 or beyond)
    const C* row[W];  // past the last key, the last again (those lanes are not stored)
    for (int i = 0; i < W; ++i) row[i] = cache + rows[i0 + std::min<int64_t>(i, cnt - 1)] * D;
    for (int64_t g = 0; g < G; ++g) {
      Vec acc[W];
      for (int i = 0; i < W; ++i) acc[i] = mt::zero();
      for (int v = 0; v < V; ++v) {
        const Vec qv = mt::load(q + g * D + W * v);
        for (int i = 0; i < W; ++i) acc[i] = mt::fmadd(qv, mt::load(row[i] + W * v), acc[i]);
      }
      mt::store_first(scores + g * n + i0, mt::hsum_lanes(acc), static_cast<int>(cnt));
    }
  }
}

#if MIAOTUI_VEC_AVX512 && defined(__GNUC__)
// grouped_scores for a bf16 query and cache on CPUs with AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products a lane pair,
// summed in fp32): a key row feeds the products as it is stored, where the fp32 loop widens it again for every head
// of the group (two instructions a vector) and multiplies half as many pairs an instruction. Each product of two
// bf16 values is exact in fp32; the sums are fp32 as before, in another order, and the scale multiplies the dot
// product instead of the query (the query stays bf16, as stored). Only the avx512 build has it; whether the CPU
// has the units is asked at run time (`bf16_dot`).
template <int V>
__attribute__((target("avx512bf16"))) void grouped_scores_bf16(const BF16* q, int64_t G, float scale,
                                                               const BF16* cache, const int64_t* rows, int64_t n,
                                                               float* scores) {
  constexpr int64_t D = W * V, P = D / 32;  // 32 bf16 values a vector
  static_assert(D % 32 == 0, "whole vectors of 32 bf16 values a row");
  const Vec vscale = mt::set1(scale);
  for (int64_t i0 = 0; i0 < n; i0 += W) {
    const int64_t cnt = std::min<int64_t>(W, n - i0);
    for (int64_t i = i0 ? i0 + 2 * W : W; i < std::min(n, i0 + 3 * W); ++i) prefetch_row(cache + rows[i] * D, D);
    for (int64_t g = 0; g < G; ++g) {
      __m512bh qv[P];
      for (int64_t v = 0; v < P; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * v);
      Vec acc[W];
      for (int i = 0; i < W; ++i) {
        __m512 a = _mm512_setzero_ps();
        if (i < cnt) {
          const BF16* row = cache + rows[i0 + i] * D;
          for (int64_t v = 0; v < P; ++v) a = _mm512_dpbf16_ps(a, qv[v], (__m512bh)_mm512_loadu_si512(row + 32 * v));
        }
        acc[i] = {a};
      }
      mt::store_first(scores + g * n + i0, mt::hsum_lanes(acc) * vscale, static_cast<int>(cnt));
    }
  }
}

// grouped_values for a bf16 cache on the same units: two keys at a time, their value rows interleaved (element d
// of key i beside element d of key i + 1) against the pair of their probabilities, rounded to bf16 first — as the
// reference does (transformers' attention casts the softmax to the values' dtype before their product; so does
// torch's CPU SDPA). `pb`: scratch for G * (n + 1) bf16 values. The interleave works within 128-bit lanes, so each
// 32 outputs come out as two vectors in a fixed shuffled order, put back in order once at the end.
template <int V>
__attribute__((target("avx512bf16"))) void grouped_values_bf16(const float* p, int64_t G, const BF16* cache,
                                                               const int64_t* rows, int64_t n, float* out, BF16* pb) {
  constexpr int64_t D = W * V, P = D / 32;
  constexpr int64_t CHUNK = V >= W ? 1 : W / V;
  const int64_t n2 = (n + 1) / 2 * 2;
  for (int64_t g = 0; g < G; ++g) {
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(p + g * n + i));  // to nearest even, as torch
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + g * n2 + i), (__m256i)rounded);
    }
    for (; i < n; ++i) pb[g * n2 + i] = BF16(p[g * n + i]);
    if (n2 > n) pb[g * n2 + n] = BF16(0.f);
  }
  const __m512i lo_order = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi_order = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t g0 = 0; g0 < G; g0 += CHUNK) {
    const int64_t gc = std::min<int64_t>(CHUNK, G - g0);
    __m512 acc[CHUNK][2 * P];
    for (int64_t g = 0; g < CHUNK; ++g)
      for (int64_t v = 0; v < 2 * P; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 2) {
      if (i + 16 < n) {
        prefetch_row(cache + rows[i + 16] * D, D);
        if (i + 17 < n) prefetch_row(cache + rows[i + 17] * D, D);
      }
      const BF16* r0 = cache + rows[i] * D;
      const BF16* r1 = i + 1 < n ? cache + rows[i + 1] * D : nullptr;
      __m512i lo[P], hi[P];
      for (int64_t v = 0; v < P; ++v) {
        const __m512i x = _mm512_loadu_si512(r0 + 32 * v);
        const __m512i y = r1 ? _mm512_loadu_si512(r1 + 32 * v) : _mm512_setzero_si512();
        lo[v] = _mm512_unpacklo_epi16(x, y);
        hi[v] = _mm512_unpackhi_epi16(x, y);
      }
      for (int64_t g = 0; g < CHUNK; ++g) {
        if (g >= gc) break;
        int32_t pair;
        std::memcpy(&pair, pb + (g0 + g) * n2 + i, 4);
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
        for (int64_t v = 0; v < P; ++v) {
          acc[g][2 * v] = _mm512_dpbf16_ps(acc[g][2 * v], (__m512bh)lo[v], pp);
          acc[g][2 * v + 1] = _mm512_dpbf16_ps(acc[g][2 * v + 1], (__m512bh)hi[v], pp);
        }
      }
    }
    for (int64_t g = 0; g < gc; ++g)
      for (int64_t v = 0; v < P; ++v) {
        float* o = out + (g0 + g) * D + 32 * v;
        _mm512_storeu_ps(o, _mm512_permutex2var_ps(acc[g][2 * v], lo_order, acc[g][2 * v + 1]));
        _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(acc[g][2 * v], hi_order, acc[g][2 * v + 1]));
      }
  }
}

inline bool bf16_dot() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}
#endif

// out[g * D ...] = Σ_i p[g * n + i] v(rows[i]) for the G heads, as many heads at a time as keep their accumulators
// in registers (each value row is read once per such chunk). Short rows (V <= 4 vectors) stay in registers for the
// chunk's heads; longer ones are read from L1 per head, which leaves the registers to more heads' sums: a 128-wide
// row held in 8 registers left 2 heads a chunk and spilled their sums (3 heads a chunk: Qwen2.5's values 1.37x
// faster, one AVX-512 thread).
template <int V, typename C>
void grouped_values(const float* p, int64_t G, const C* cache, const int64_t* rows, int64_t n, float* out) {
  constexpr int64_t D = W * V;
  constexpr bool held = V <= 4 || !std::is_same_v<C, float>;  // (widened int8 / bf16 rows: once, as before)
  constexpr int64_t SUMS = W == 16 ? 24 : 12;  // accumulators the vector registers keep (32 or 16 of them)
  constexpr int64_t CHUNK = held ? std::max<int64_t>(1, W / V) : std::max<int64_t>(1, SUMS / V);
  for (int64_t g0 = 0; g0 < G; g0 += CHUNK) {
    const int64_t gc = std::min<int64_t>(CHUNK, G - g0);
    Vec acc[CHUNK][V];
    for (int64_t g = 0; g < CHUNK; ++g)
      for (int v = 0; v < V; ++v) acc[g][v] = mt::zero();
    for (int64_t i = 0; i < n; ++i) {
      const C* row = cache + rows[i] * D;
      if (i + 16 < n) prefetch_row(cache + rows[i + 16] * D, D);
      if constexpr (held) {
        Vec rv[V];
        for (int v = 0; v < V; ++v) rv[v] = mt::load(row + W * v);
        for (int64_t g = 0; g < CHUNK; ++g) {
          if (g >= gc) break;
          const Vec pi = mt::set1(p[(g0 + g) * n + i]);
          for (int v = 0; v < V; ++v) acc[g][v] = mt::fmadd(pi, rv[v], acc[g][v]);
        }
      } else {  // every head of the chunk, the last again past G (not stored): no branch between the sums
        for (int64_t g = 0; g < CHUNK; ++g) {
          const Vec pi = mt::set1(p[(g0 + std::min(g, gc - 1)) * n + i]);
          for (int v = 0; v < V; ++v) acc[g][v] = mt::fmadd(pi, mt::load(row + W * v), acc[g][v]);
        }
      }
    }
    for (int64_t g = 0; g < gc; ++g)
      for (int v = 0; v < V; ++v) mt::store(out + (g0 + g) * D + W * v, acc[g][v]);
  }
}

// The plain loops (any head size): one query head against one cached key, and a weighted sum of values.
template <typename C>
inline float dot_head(const float* q, const C* k, int64_t D) {
  float dot = 0.f;
  for (int64_t j = 0; j < D; ++j) dot += q[j] * mt::to_f(k[j]);
  return dot;
}

template <typename C>
inline void weighted_sum(const float* p, const C* cache, const int64_t* rows, int64_t n, int64_t D, float* out) {
  std::fill(out, out + D, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < D; ++j) out[j] += p[i] * mt::to_f(cache[rows[i] * D + j]);
}

inline void softmax(float* s, int64_t n) {
  const float inv = 1.f / mt::exp_scores(s, n).sum;
  const Vec vinv = mt::set1(inv);
  int64_t i = 0;
  for (; i + W <= n; i += W) mt::store(s + i, mt::load(s + i) * vinv);
  for (; i < n; ++i) s[i] *= inv;
}

// Keys per work item in the vectorized path: a longer context is cut into spans of this many keys, each scored by an
// item of its own, and the spans' partial softmaxes merged (flash-decoding) — so one sequence with few kv heads
// (Gemma 3 270M has one, SmolLM2 three) keeps both cores busy at long contexts. The cut depends only on the
// sequence's own length: its result is the same whatever the batch or the number of threads.
constexpr int64_t SPAN = 256;

template <int V, typename T, typename C>
void paged_attention_impl(const T* q, int64_t q_stride, T* out, const C* kc, const C* vc, const T* ks, const T* vs,
                          const int64_t* tables, int64_t table_width, const int64_t* lens, int64_t B, int64_t Hq,
                          int64_t Hkv, int64_t D, int64_t BS, float scale, int64_t window) {
  const int64_t group = Hq / Hkv, units = B * Hkv;
  auto visible = [&](int64_t b) {  // the first visible key of sequence b
    return window > 0 ? std::max<int64_t>(0, lens[b] - window) : int64_t{0};
  };
  // work items: a unit (sequence, kv head) gives one, or one per span of SPAN keys. A sequence's items go span by
  // span, each span's kv heads side by side: the heads' rows of a token lie next to each other in the cache, so a
  // thread reads a span's keys and values as one stretch of memory, and the lines the hardware prefetcher brings in
  // beyond one head's rows are the next item's (head by head, a thread read a third of each stretch, SmolLM2's three
  // kv heads, and the rest the prefetcher brought was gone before its own item came).
  std::vector<int64_t> first_item(B + 1, 0), spans(B);  // per sequence: its first item, its spans
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens[b] - visible(b);
    spans[b] = V > 0 && n > SPAN ? (n + SPAN - 1) / SPAN : 1;
    first_item[b + 1] = first_item[b] + spans[b] * Hkv;
  }
  const int64_t items = first_item[B];
  std::vector<float> part, part_max, part_sum;  // split units: per item, [group, D] sums and per head max, sum
  if (items > units) {
    part.resize(items * group * D);
    part_max.resize(items * group);
    part_sum.resize(items * group);
  }
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, p, qf(D), acc(D);
    std::vector<BF16> pbf;
    std::vector<int64_t> rows;
    int64_t b = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (first_item[b + 1] <= item) ++b;
      const int64_t span = (item - first_item[b]) / Hkv, kvh = (item - first_item[b]) % Hkv;
      const int64_t len = lens[b], first = visible(b);
      const bool split = spans[b] > 1;
      const int64_t k0 = first + span * SPAN, k1 = split ? std::min(len, k0 + SPAN) : len;
      const int64_t n = k1 - k0;
      // the cache row of each key of this item for this kv head, block by block
      rows.resize(n);
      const int64_t* table = tables + b * table_width;
      for (int64_t blk = k0 / BS; blk * BS < k1; ++blk) {
        const int64_t t0 = std::max(k0, blk * BS), t1 = std::min(k1, blk * BS + BS);
        for (int64_t t = t0; t < t1; ++t) rows[t - k0] = ((table[blk] - blk) * BS + t) * Hkv + kvh;
      }
      if constexpr (V > 0) {  // the group's query heads share every key and value row they read
        scores.resize(group * n);
        qf.resize(group * D);
        acc.resize(group * D);
        const int64_t head0 = b * Hq + kvh * group;
        const T* qg = q + b * q_stride + kvh * group * D;  // the group's query heads (a row may be strided)
        bool bf16_units = false;  // a bf16 query and cache on AVX-512 BF16: both products on `vdpbf16ps`
#if MIAOTUI_VEC_AVX512 && defined(__GNUC__)
        constexpr bool bf16_rows = std::is_same_v<T, BF16> && std::is_same_v<C, BF16> && V % 2 == 0;
        if constexpr (bf16_rows) {
          bf16_units = bf16_dot();
          if (bf16_units) grouped_scores_bf16<V>(qg, group, scale, kc, rows.data(), n, scores.data());
        }
#endif
        if (!bf16_units) {
          for (int64_t j = 0; j < group * D; j += W) mt::store(&qf[j], mt::load(qg + j) * mt::set1(scale));
          grouped_scores<V>(qf.data(), group, kc, rows.data(), n, scores.data());
        }
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * n;
          if (ks)
            for (int64_t i = 0; i < n; ++i) sg[i] *= mt::to_f(ks[rows[i]]);
          if (split) {
            const mt::MaxSum ms = mt::exp_scores(sg, n);
            part_max[item * group + g] = ms.max;
            part_sum[item * group + g] = ms.sum;
          } else {
            softmax(sg, n);
          }
          if (vs)
            for (int64_t i = 0; i < n; ++i) sg[i] *= mt::to_f(vs[rows[i]]);
        }
#if MIAOTUI_VEC_AVX512 && defined(__GNUC__)
        if constexpr (bf16_rows) {
          if (bf16_units) {
            pbf.resize(group * (n + 1));
            grouped_values_bf16<V>(scores.data(), group, vc, rows.data(), n, acc.data(), pbf.data());
          }
        }
#endif
        if (!bf16_units) grouped_values<V>(scores.data(), group, vc, rows.data(), n, acc.data());
        if (split) std::copy(acc.begin(), acc.begin() + group * D, part.begin() + item * group * D);
        else
          for (int64_t j = 0; j < group * D; j += W) mt::store(out + head0 * D + j, mt::load(&acc[j]));
        continue;
      }
      scores.resize(n);
      p.resize(n);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = b * Hq + kvh * group + g;
        for (int64_t j = 0; j < D; ++j) qf[j] = mt::to_f(q[b * q_stride + (kvh * group + g) * D + j]) * scale;
        for (int64_t i = 0; i < n; ++i)
          scores[i] = dot_head(qf.data(), kc + rows[i] * D, D) * (ks ? mt::to_f(ks[rows[i]]) : 1.f);
        softmax(scores.data(), n);
        for (int64_t i = 0; i < n; ++i) p[i] = scores[i] * (vs ? mt::to_f(vs[rows[i]]) : 1.f);
        weighted_sum(p.data(), vc, rows.data(), n, D, acc.data());
        for (int64_t j = 0; j < D; ++j) out[head * D + j] = mt::from_f<T>(acc[j]);
      }
    }
  });
  if (items == units) return;
  // the spans of each split unit merged: weights exp(max_span - max) over the spans' sums
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t b = unit / Hkv, kvh = unit % Hkv;
    if (spans[b] == 1) continue;
    const int64_t head0 = b * Hq + kvh * group;
    auto item_of = [&](int64_t span) { return first_item[b] + span * Hkv + kvh; };
    for (int64_t g = 0; g < group; ++g) {
      float mx = -INFINITY, total = 0.f;
      for (int64_t sp = 0; sp < spans[b]; ++sp) mx = std::max(mx, part_max[item_of(sp) * group + g]);
      std::vector<float> o(D, 0.f);
      for (int64_t sp = 0; sp < spans[b]; ++sp) {
        const int64_t it = item_of(sp);
        const float w = std::exp(part_max[it * group + g] - mx);
        total += w * part_sum[it * group + g];
        const float* a = part.data() + (it * group + g) * D;
        for (int64_t j = 0; j < D; ++j) o[j] += w * a[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < D; ++j) out[(head0 + g) * D + j] = mt::from_f<T>(o[j] * inv);
    }
  }
}

}  // namespace

Tensor rms_norm(const Tensor& x_, const Tensor& w, double eps) {
  Tensor x = x_.contiguous();
  Tensor y = at::empty_like(x);
  rms_norm_out(x, w, eps, y);
  return y;
}

void rms_norm_out(const Tensor& x, const Tensor& w, double eps, Tensor& y) {
  check_cpu(x, "x");
  check_cpu(w, "weight");
  check_cpu(y, "out");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && y.scalar_type() == x.scalar_type(),
              "rms_norm: x, weight and out dtypes differ");
  const int64_t d = x.size(-1);
  TORCH_CHECK(w.numel() == d && y.numel() == x.numel(), "rms_norm: shapes do not match");
  DISPATCH_FLOAT(x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel() / d,
                            d, static_cast<float>(eps));
  });
}

Tensor gated_act(const Tensor& x_, bool gelu) {
  Tensor x = x_.contiguous();
  const int64_t d = x.size(-1) / 2;
  auto shape = x.sizes().vec();
  shape.back() = d;
  Tensor y = at::empty(shape, x.options());
  DISPATCH_FLOAT(x.scalar_type(), "gated_act", [&] {
    if (gelu) gated_impl<scalar_t, true>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel() / (2 * d), d);
    else gated_impl<scalar_t, false>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel() / (2 * d), d);
  });
  return y;
}

namespace {

void rope_of(Tensor& x, int64_t t_stride, int64_t h_stride, int64_t T_, int64_t H, int64_t D,
             const Tensor& positions, const Tensor& cos, const Tensor& sin) {
  check_cpu(positions, "positions");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  TORCH_CHECK(positions.scalar_type() == at::kLong && cos.scalar_type() == at::kFloat, "rope: dtypes");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && sin.sizes() == cos.sizes(), "rope: table shapes");
  TORCH_CHECK(positions.numel() == T_, "rope: one position a row");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rope: position ", pos[t], " is beyond the angle table");
  DISPATCH_FLOAT(x.scalar_type(), "rope", [&] {
    rope_impl<scalar_t>(x.data_ptr<scalar_t>(), t_stride, h_stride, pos, cos.data_ptr<float>(), sin.data_ptr<float>(),
                        T_, H, D);
  });
}

}  // namespace

void rope_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope: x must be [T, H, D] with contiguous heads");
  rope_of(x, x.stride(0), x.stride(1), x.size(0), x.size(1), x.size(2), positions, cos, sin);
}

void rope_rows_(Tensor& rows, int64_t heads, int64_t D, const Tensor& positions, const Tensor& cos,
                const Tensor& sin) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.stride(1) == 1 && rows.size(1) >= heads * D,
              "rope: rows of at least heads x D values");
  rope_of(rows, rows.stride(0), D, rows.size(0), heads, D, positions, cos, sin);
}

namespace {

// q: row b's query heads start at q[b * q_stride], Hq heads of D contiguous values; the output [B, Hq, D], or
// [B, Hq * D] where `flat`.
Tensor attention_of(const Tensor& q, int64_t q_stride, int64_t B, int64_t Hq, bool flat, const Tensor& k_cache,
                    const Tensor& v_cache, const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale,
                    const Tensor& block_tables, const Tensor& context_lens, double scale, int64_t window) {
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  check_cpu(block_tables, "block_tables");
  check_cpu(context_lens, "context_lens");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_attention: block tables and lengths must be int64");
  const int64_t D = k_cache.size(3), BS = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0, "paged_attention: shapes do not match");
  TORCH_CHECK(block_tables.size(0) >= B && context_lens.numel() >= B, "paged_attention: a table and length a row");
  Tensor out = flat ? at::empty({B, Hq * D}, q.options()) : at::empty({B, Hq, D}, q.options());
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == k_scale.has_value(), "paged_attention: an int8 cache needs its scales");
  DISPATCH_FLOAT(q.scalar_type(), "paged_attention", [&] {
    const scalar_t* ks = int8 ? k_scale->data_ptr<scalar_t>() : nullptr;
    const scalar_t* vs = int8 ? v_scale->data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto* kc, auto* vc) {
      using C = std::remove_pointer_t<decltype(kc)>;
      auto impl = D == 4 * W ? paged_attention_impl<4, scalar_t, C>
                : D == 8 * W ? paged_attention_impl<8, scalar_t, C>
                : D == 16 * W ? paged_attention_impl<16, scalar_t, C>
                : D == 32 * W ? paged_attention_impl<32, scalar_t, C>
                              : paged_attention_impl<0, scalar_t, C>;
      impl(q.data_ptr<scalar_t>(), q_stride, out.data_ptr<scalar_t>(), kc, vc, ks, vs,
           block_tables.data_ptr<int64_t>(), block_tables.size(1), context_lens.data_ptr<int64_t>(), B, Hq, Hkv, D,
           BS, static_cast<float>(scale), window);
    };
    if (int8) run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    else run(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

Tensor paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale,
                       const Tensor& block_tables, const Tensor& context_lens, double scale, int64_t window) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.size(3) == q.size(2),
              "paged_attention: shapes do not match");
  return attention_of(q, q.size(1) * q.size(2), q.size(0), q.size(1), false, k_cache, v_cache, k_scale, v_scale,
                      block_tables, context_lens, scale, window);
}

Tensor paged_attention_rows(const Tensor& rows, int64_t heads, const Tensor& k_cache, const Tensor& v_cache,
                            const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale,
                            const Tensor& block_tables, const Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.stride(1) == 1 && k_cache.dim() == 4 &&
              rows.size(1) >= heads * k_cache.size(3), "paged_attention: rows of at least heads x D values");
  return attention_of(rows, rows.stride(0), rows.size(0), heads, true, k_cache, v_cache, k_scale, v_scale, block_tables,
                      context_lens, scale, window);
}

// The index of each row's maximum (the first one, as torch.argmax; NaNs are never chosen): torch's CPU argmax walks
// a [32, 49152] logits matrix at ~1 ns an element, 1.9 ms of a batch-32 decode step. Two passes over the row (it
// stays in L2): its maximum W lanes at a time, then the first index that holds it.
Tensor argmax_rows(const Tensor& x_) {
  check_cpu(x_, "x");
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "argmax_rows: float32 [rows, n]");
  Tensor x = x_.contiguous();
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "argmax_rows: empty rows");
  Tensor out = at::empty({R}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      Vec vbest = mt::set1(-INFINITY);
      int64_t i = 0;
      for (; i + W <= n; i += W) vbest = mt::vmax(mt::load(row + i), vbest);  // a NaN lane keeps the best so far
      float best = mt::reduce_max(vbest);
      for (; i < n; ++i)
        if (row[i] > best) best = row[i];
      int64_t arg = 0;
      for (i = 0; i < n; ++i)
        if (row[i] == best) {
          arg = i;
          break;
        }
      op[r] = arg;
    }
  });
  return out;
}

// Each row's k largest values and their indices, largest first; equal values in index order; a NaN counts as -inf.
// torch's CPU topk copies and partially sorts the whole row: 100-280 us for the 64 best of SmolLM2's 49k logits, most
// of a sampled token's cost (the sampler's top-p looks at each row's best candidates first). Here two passes: the
// maximum of each block of 4W columns, then only the blocks whose maximum reaches the k-th largest block maximum —
// a bound the k-th largest value cannot be below (k blocks hold a value at least that large) — are scanned for
// their columns above it, and those sorted. Rows run in parallel.
std::tuple<Tensor, Tensor> topk_rows(const Tensor& x_, int64_t k) {
  check_cpu(x_, "x");
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "topk_rows: float32 [rows, n]");
  Tensor x = x_.contiguous();
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "topk_rows: k must be in [1, n]");
  Tensor values = at::empty({R, k}, x.options());
  Tensor indices = at::empty({R, k}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  constexpr int64_t BLOCK = 4 * W;
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    struct Cand {
      float v;
      int64_t i;
    };
    auto better = [](const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); };
    std::vector<float> bmax(blocks), sorted(blocks);
    std::vector<Cand> cand;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i0 = b * BLOCK;
        float m = -INFINITY;
        if (i0 + BLOCK <= n) {
          Vec v = mt::set1(-INFINITY);  // (load, best): a NaN lane keeps the best so far
          for (int64_t j = 0; j < BLOCK; j += W) v = mt::vmax(mt::load(row + i0 + j), v);
          m = mt::reduce_max(v);
        } else {
          for (int64_t j = i0; j < n; ++j)
            if (row[j] > m) m = row[j];
        }
        bmax[b] = m;
      }
      float thr = -INFINITY;  // the k-th largest block maximum: no value of the top k is below it
      if (k <= blocks) {
        sorted = bmax;
        std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
        thr = sorted[k - 1];
      }
      cand.clear();
      for (int64_t b = 0; b < blocks; ++b) {
        if (!(bmax[b] > thr)) continue;
        for (int64_t j = b * BLOCK, e = std::min(n, j + BLOCK); j < e; ++j)
          if (row[j] > thr) cand.push_back({row[j], j});
      }
      if (static_cast<int64_t>(cand.size()) < k)  // values equal to the bound (or -inf, NaN) fill up, in index order
        for (int64_t j = 0; j < n && static_cast<int64_t>(cand.size()) < k; ++j) {
          const float v = std::isnan(row[j]) ? -INFINITY : row[j];
          if (v == thr) cand.push_back({v, j});
        }
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), better);
      for (int64_t j = 0; j < k; ++j) {
        vp[r * k + j] = cand[j].v;
        ip[r * k + j] = cand[j].i;
      }
    }
  });
  return {values, indices};
}

// y = x @ wᵀ for fp32 x [M, K] and w [N, K] with few rows (decode sizes). torch's CPU product (MKL) reads a weight
// at a fraction of memory bandwidth from 2 rows on where its kernels are not tuned (AMD: the 151936 x 896 head at 4
// rows 119 ms, here 27 ms); here each thread streams its own weight rows, 4 at a time, and meets the x rows two at a
// time while they are in L1. Each output is one row's dot product in a fixed order, whatever M or the thread count.
Tensor dense_matmul(const Tensor& x_, const Tensor& w) {
  check_cpu(w, "w");  // read in place: a copy per call would cost more than the product
  TORCH_CHECK(x_.device().is_cpu() && x_.dim() == 2 && w.dim() == 2 && x_.size(1) == w.size(1) &&
              x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "dense_matmul: float32 x [M, K] and w [N, K]");
  Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int R = 4;  // weight rows a pass
  const int64_t K0 = K / W * W;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));  // passes of at least ~32 KB
  at::parallel_for(0, (N + R - 1) / R, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const int rows = static_cast<int>(std::min<int64_t>(R, N - n0));
      const float* wr[R];
      for (int r = 0; r < R; ++r) wr[r] = wp + (n0 + std::min(r, rows - 1)) * K;  // a short pass repeats its last row
      for (int64_t m0 = 0; m0 < M; m0 += 2) {  // two x rows a pass (the second repeats the first when M is odd)
        const float* x0 = xp + m0 * K;
        const float* x1 = xp + std::min(m0 + 1, M - 1) * K;
        Vec a0[R], a1[R];
        for (int r = 0; r < R; ++r) a0[r] = mt::zero(), a1[r] = mt::zero();
        for (int64_t k = 0; k < K0; k += W) {
          const Vec v0 = mt::load(x0 + k), v1 = mt::load(x1 + k);
          for (int r = 0; r < R; ++r) {
            const Vec wv = mt::load(wr[r] + k);
            a0[r] = mt::fmadd(wv, v0, a0[r]);
            a1[r] = mt::fmadd(wv, v1, a1[r]);
          }
        }
        float sums[2][R];  // (indexed by constants only, the accumulators stay in registers through the loop)
        for (int r = 0; r < R; ++r) sums[0][r] = mt::reduce_add(a0[r]), sums[1][r] = mt::reduce_add(a1[r]);
        for (int i = 0; i < 2 && m0 + i < M; ++i) {
          const float* xr = i ? x1 : x0;
          for (int r = 0; r < rows; ++r) {
            float s = sums[i][r];
            for (int64_t k = K0; k < K; ++k) s += wr[r][k] * xr[k];
            op[(m0 + i) * N + n0 + r] = s;
          }
        }
      }
    }
  });
  return out;
}
