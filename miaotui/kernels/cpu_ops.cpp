// miaotui's CPU kernels: the decode step's small ops, each fused into one call.
//
// At decode sizes (one to a few tokens of a 576-wide model) every torch op costs microseconds of dispatch and
// thread wake-up for nanoseconds of work: RMSNorm was five ops, rotary embedding six, the gated activation three,
// and decode attention a gather, a mask and SDPA per layer. The inner loops use AVX-512 where the compiler
// targets it and plain C++ elsewhere, so the extension builds anywhere.
// Python reaches them through miaotui/kernels/__init__.py, which falls back to plain torch when they are absent.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define MIAOTUI_AVX512 1
#else
#define MIAOTUI_AVX512 0
#endif

using at::BFloat16;
using at::Tensor;

// qmatmul.cpp
bool qmatmul_fast();
bool qmatmul_amx();
Tensor qmatmul(const Tensor& x, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t N,
               const c10::optional<Tensor>& in_scale, bool reference);
Tensor tile_matmul(const Tensor& x, const Tensor& tiles, int64_t N);

namespace {

inline float to_f(float x) { return x; }
inline float to_f(BFloat16 x) { return static_cast<float>(x); }
inline float to_f(int8_t x) { return static_cast<float>(x); }

template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

// Run `fn` (a generic lambda) with scalar_t bound to the tensor's float type: fp32 or bf16, the model dtypes.
#define DISPATCH_FLOAT(TYPE, NAME, ...)                                                \
  [&] {                                                                                \
    if ((TYPE) == at::kFloat) { using scalar_t = float; return __VA_ARGS__(); }       \
    TORCH_CHECK((TYPE) == at::kBFloat16, NAME, ": float32 or bfloat16 only");          \
    using scalar_t = BFloat16;                                                         \
    return __VA_ARGS__();                                                              \
  }()

// ---------------------------------------------------------------------------------------------------------------
// 16-lane fp32 vectors loaded from and stored to every element type the kernels meet.
#if MIAOTUI_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m256i to_bf16_bits(__m512 v) {  // round to nearest even, as torch's float -> bfloat16 does
  __m512i b = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}
inline void store16(BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v)); }
// v rounded to T's precision and back (a no-op for fp32)
inline __m512 round_to(float*, __m512 v) { return v; }
inline __m512 round_to(BFloat16*, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}
// e^x to ~1 ulp: 2^(x log2 e) split into 2^n (scalef) and 2^f, f in [-0.5, 0.5], by its Taylor polynomial
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  static const float c[] = {1.525273e-05f, 1.540353e-04f, 1.333356e-03f, 9.618129e-03f,
                            5.550411e-02f, 2.402265e-01f, 6.931472e-01f, 1.f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}
#endif

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
      float ss = 0.f;
      int64_t i = 0;
#if MIAOTUI_AVX512
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(load16(xr + i), load16(xr + i), acc);
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; i < d; ++i) ss += to_f(xr[i]) * to_f(xr[i]);
      float inv = 1.f / std::sqrt(ss / d + eps);
      i = 0;
#if MIAOTUI_AVX512
      __m512 vinv = _mm512_set1_ps(inv);
      for (; i + 16 <= d; i += 16) store16(y + r * d + i, _mm512_mul_ps(_mm512_mul_ps(load16(xr + i), vinv), load16(w + i)));
#endif
      for (; i < d; ++i) y[r * d + i] = from_f<T>(to_f(xr[i]) * inv * to_f(w[i]));
    }
  });
}

Tensor rms_norm(const Tensor& x_, const Tensor& w, double eps) {
  Tensor x = x_.contiguous();
  check_cpu(w, "weight");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight dtypes differ");
  int64_t d = x.size(-1);
  Tensor y = at::empty_like(x);
  DISPATCH_FLOAT(x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            x.numel() / d, d, static_cast<float>(eps));
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// Gated activations over a fused [gate | up] row: y = act(gate) * up.

template <typename T, bool Gelu>
void gated_impl(const T* x, T* y, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * 2 * d;
      const T* u = g + d;
      T* yr = y + r * d;
      int64_t i = 0;
#if MIAOTUI_AVX512
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= d; i += 16) {
        __m512 a = load16(g + i), act;
        if (Gelu) {  // tanh(z) = 1 - 2 / (1 + e^2z)
          __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), a), _mm512_mul_ps(a, a), a));
          __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(one, exp16(_mm512_add_ps(z, z)))));
          act = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), a), _mm512_add_ps(one, th));
        } else {
          act = _mm512_div_ps(a, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
        }
        store16(yr + i, _mm512_mul_ps(round_to(yr, act), load16(u + i)));
      }
#endif
      for (; i < d; ++i) {
        float a = to_f(g[i]);
        float act;
        if (Gelu) {
          act = 0.5f * a * (1.f + std::tanh(0.7978845608028654f * (a + 0.044715f * a * a * a)));
        } else {
          act = a / (1.f + std::exp(-a));
        }
        // Round the activation to T first, as torch's unfused `act(gate) * up` does.
        yr[i] = from_f<T>(to_f(from_f<T>(act)) * to_f(u[i]));
      }
    }
  });
}

Tensor gated_act(const Tensor& x_, bool gelu) {
  Tensor x = x_.contiguous();
  int64_t d = x.size(-1) / 2;
  auto shape = x.sizes().vec();
  shape.back() = d;
  Tensor y = at::empty(shape, x.options());
  DISPATCH_FLOAT(x.scalar_type(), "gated_act", [&] {
    if (gelu) gated_impl<scalar_t, true>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel() / (2 * d), d);
    else gated_impl<scalar_t, false>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel() / (2 * d), d);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// Rotary embedding, NEOX layout, in place on x [T, H, D] (rows may be strided, as q|k inside a fused qkv output):
// the first and second halves of each head rotate together by the angles of the token's position.

template <typename T>
void rope_impl(T* x, int64_t t_stride, int64_t h_stride, const int64_t* pos, const float* cos, const float* sin,
               int64_t T_, int64_t H, int64_t D) {
  int64_t half = D / 2;
  at::parallel_for(0, T_ * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t t = i / H, h = i % H;
      T* v = x + t * t_stride + h * h_stride;
      const float* c = cos + pos[t] * D;
      const float* s = sin + pos[t] * D;
      for (int64_t j = 0; j < half; ++j) {
        float a = to_f(v[j]), b = to_f(v[j + half]);
        v[j] = from_f<T>(a * c[j] - b * s[j]);
        v[j + half] = from_f<T>(b * c[j + half] + a * s[j + half]);
      }
    }
  });
}

void rope_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope: x must be [T, H, D] with contiguous heads");
  check_cpu(positions, "positions");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  TORCH_CHECK(positions.scalar_type() == at::kLong && cos.scalar_type() == at::kFloat, "rope: dtypes");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == x.size(2) && sin.sizes() == cos.sizes(), "rope: table shapes");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.numel(); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rope: position ", pos[t], " is beyond the angle table");
  DISPATCH_FLOAT(x.scalar_type(), "rope", [&] {
    rope_impl<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), positions.data_ptr<int64_t>(),
                        cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0), x.size(1), x.size(2));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Decode attention straight over the paged cache: one query token per sequence, no gather, no mask.
// Work unit = (sequence, kv head): its group of query heads scores every visible key, softmax, weighted values.

// The plain loops (any CPU, any head size): one query head against one cached key, and a weighted sum of values.
template <typename C>
inline float dot_head(const float* q, const C* k, int64_t D) {
  float dot = 0.f;
  for (int64_t j = 0; j < D; ++j) dot += q[j] * to_f(k[j]);
  return dot;
}

// out[0:D] = Σ_i p[i] · v(rows[i]), accumulated in fp32.
template <typename C>
inline void weighted_sum(const float* p, const C* cache, const int64_t* rows, int64_t n, int64_t D, float* out) {
  std::fill(out, out + D, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < D; ++j) out[j] += p[i] * to_f(cache[rows[i] * D + j]);
}

#if MIAOTUI_AVX512
// The cache rows a sequence visits are scattered over its blocks, too irregular for the hardware prefetcher: a
// batch-32 decode step reads ~80 MB of keys and values for SmolLM2, as much as its 4-bit weights. Into L2: perf
// found the loop waiting on the prefetches themselves when they went to L1 (its few fill buffers full); 30 layers
// of batch-32 attention over 128 keys 7.5-8.9 -> 6.6-7.1 ms.
template <typename C>
inline void prefetch_row(const C* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(C)); b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// v[0..15] -> one vector whose lane i is the sum of v[i]'s lanes (a transposing add tree: 45 instructions for 16
// sums, where 16 horizontal reductions take ~150).
inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[g * n + i] = q_g . k(rows[i]) for the G query heads of one kv head, 16 keys at a time: each key's row is
// read from memory once for all G heads (later heads find it in L1).
template <int V, typename C>
inline void grouped_scores(const float* q, int64_t G, const C* cache, const int64_t* rows, int64_t n, float* scores) {
  constexpr int64_t D = 16 * V;
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, n - i0);
    for (int64_t i = i0 ? i0 + 32 : 16; i < std::min(n, i0 + 48); ++i) prefetch_row(cache + rows[i] * D, D);
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[V], acc[16];
      for (int v = 0; v < V; ++v) qv[v] = _mm512_loadu_ps(q + g * D + 16 * v);
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (i < cnt) {
          const C* row = cache + rows[i0 + i] * D;
          for (int v = 0; v < V; ++v) acc[i] = _mm512_fmadd_ps(qv[v], load16(row + 16 * v), acc[i]);
        }
      }
      _mm512_mask_storeu_ps(scores + g * n + i0, static_cast<__mmask16>((1u << cnt) - 1), hsum16(acc));
    }
  }
}

// out[g * D ...] = Σ_i p[g * n + i] v(rows[i]) for the G heads, as many heads at a time as keep their
// accumulators in registers (each value row is read once per such chunk).
template <int V, typename C>
inline void grouped_values(const float* p, int64_t G, const C* cache, const int64_t* rows, int64_t n, float* out) {
  constexpr int64_t D = 16 * V;
  constexpr int64_t CHUNK = V >= 16 ? 1 : 16 / V;
  for (int64_t g0 = 0; g0 < G; g0 += CHUNK) {
    const int64_t gc = std::min<int64_t>(CHUNK, G - g0);
    __m512 acc[CHUNK][V];
    for (int64_t g = 0; g < CHUNK; ++g)
      for (int v = 0; v < V; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const C* row = cache + rows[i] * D;
      if (i + 16 < n) prefetch_row(cache + rows[i + 16] * D, D);
      __m512 rv[V];
      for (int v = 0; v < V; ++v) rv[v] = load16(row + 16 * v);
      for (int64_t g = 0; g < CHUNK; ++g) {
        if (g >= gc) break;
        const __m512 pi = _mm512_set1_ps(p[(g0 + g) * n + i]);
        for (int v = 0; v < V; ++v) acc[g][v] = _mm512_fmadd_ps(pi, rv[v], acc[g][v]);
      }
    }
    for (int64_t g = 0; g < gc; ++g)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (g0 + g) * D + 16 * v, acc[g][v]);
  }
}
#endif

// In place over n scores: softmax. Every pass 16 lanes at a time: a scalar running maximum is a chain of
// dependent `vmaxss` that perf put at a fifth of the whole attention.
inline void softmax(float* s, int64_t n) {
  float mx = -INFINITY;
  int64_t i = 0;
#if MIAOTUI_AVX512
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + i));
  mx = _mm512_reduce_max_ps(vmx);
#endif
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  float sum = 0.f;
  i = 0;
#if MIAOTUI_AVX512
  __m512 vsum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), _mm512_set1_ps(mx)));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  const float inv = 1.f / sum;
  i = 0;
#if MIAOTUI_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), _mm512_set1_ps(inv)));
#endif
  for (; i < n; ++i) s[i] *= inv;
}

template <int V, typename T, typename C>
void paged_attention_impl(const T* q, T* out, const C* kc, const C* vc, const T* ks, const T* vs,
                          const int64_t* tables, int64_t table_width, const int64_t* lens, int64_t B, int64_t Hq,
                          int64_t Hkv, int64_t D, int64_t BS, float scale, int64_t window) {
  int64_t group = Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, p, qf(D), acc(D);
    std::vector<int64_t> rows;
    for (int64_t unit = begin; unit < end; ++unit) {
      int64_t b = unit / Hkv, kvh = unit % Hkv;
      int64_t len = lens[b];
      int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      int64_t n = len - first;
      // the cache row of each visible key for this kv head, block by block
      rows.resize(n);
      const int64_t* table = tables + b * table_width;
      for (int64_t blk = first / BS; blk * BS < len; ++blk) {
        int64_t t0 = std::max(first, blk * BS), t1 = std::min(len, blk * BS + BS);
        for (int64_t t = t0; t < t1; ++t) rows[t - first] = ((table[blk] - blk) * BS + t) * Hkv + kvh;
      }
#if MIAOTUI_AVX512
      if constexpr (V > 0) {  // the group's query heads share every key and value row they read
        scores.resize(group * n);
        qf.resize(group * D);
        acc.resize(group * D);
        const int64_t head0 = b * Hq + kvh * group;
        for (int64_t j = 0; j < group * D; j += 16)  // D is a multiple of 16 here
          _mm512_storeu_ps(&qf[j], _mm512_mul_ps(load16(q + head0 * D + j), _mm512_set1_ps(scale)));
        grouped_scores<V>(qf.data(), group, kc, rows.data(), n, scores.data());
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * n;
          if (ks)
            for (int64_t i = 0; i < n; ++i) sg[i] *= to_f(ks[rows[i]]);
          softmax(sg, n);
          if (vs)
            for (int64_t i = 0; i < n; ++i) sg[i] *= to_f(vs[rows[i]]);
        }
        grouped_values<V>(scores.data(), group, vc, rows.data(), n, acc.data());
        for (int64_t j = 0; j < group * D; j += 16) store16(out + head0 * D + j, _mm512_loadu_ps(&acc[j]));
        continue;
      }
#endif
      scores.resize(n);
      p.resize(n);
      for (int64_t g = 0; g < group; ++g) {
        int64_t head = b * Hq + kvh * group + g;
        for (int64_t j = 0; j < D; ++j) qf[j] = to_f(q[head * D + j]) * scale;
        for (int64_t i = 0; i < n; ++i)
          scores[i] = dot_head(qf.data(), kc + rows[i] * D, D) * (ks ? to_f(ks[rows[i]]) : 1.f);
        softmax(scores.data(), n);
        for (int64_t i = 0; i < n; ++i) p[i] = scores[i] * (vs ? to_f(vs[rows[i]]) : 1.f);
        weighted_sum(p.data(), vc, rows.data(), n, D, acc.data());
        for (int64_t j = 0; j < D; ++j) out[head * D + j] = from_f<T>(acc[j]);
      }
    }
  });
}

// q [B, Hq, D]; caches [blocks, block_size, Hkv, D] (model dtype, or int8 with [blocks, block_size, Hkv, 1]
// scales in the model dtype); block_tables [B, W] and context_lens [B] int64. window <= 0: no sliding window.
Tensor paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale,
                       const Tensor& block_tables, const Tensor& context_lens, double scale, int64_t window) {
  check_cpu(q, "q");
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  check_cpu(block_tables, "block_tables");
  check_cpu(context_lens, "context_lens");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_attention: block tables and lengths must be int64");
  int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), BS = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(3) == D, "paged_attention: shapes do not match");
  Tensor out = at::empty_like(q);
  bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == k_scale.has_value(), "paged_attention: an int8 cache needs its scales");
  DISPATCH_FLOAT(q.scalar_type(), "paged_attention", [&] {
    const scalar_t* ks = int8 ? k_scale->data_ptr<scalar_t>() : nullptr;
    const scalar_t* vs = int8 ? v_scale->data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto* kc, auto* vc) {
      auto impl = D == 64 ? paged_attention_impl<4, scalar_t, std::remove_pointer_t<decltype(kc)>>
                : D == 128 ? paged_attention_impl<8, scalar_t, std::remove_pointer_t<decltype(kc)>>
                : D == 256 ? paged_attention_impl<16, scalar_t, std::remove_pointer_t<decltype(kc)>>
                : paged_attention_impl<0, scalar_t, std::remove_pointer_t<decltype(kc)>>;
      impl(q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), kc, vc, ks, vs,
                           block_tables.data_ptr<int64_t>(), block_tables.size(1), context_lens.data_ptr<int64_t>(),
                           B, Hq, Hkv, D, BS, static_cast<float>(scale), window);
    };
    if (int8) run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    else run(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// A decode step through a stack of Llama blocks in one call. Each block is a dozen small ops at decode sizes;
// driven from Python they cost ~100 us a block in module calls and dispatch (3 ms of a 9 ms token on SmolLM2),
// more than their arithmetic. Here the same kernels run in the same order with the same roundings, so the result
// equals the module-by-module forward exactly. Weights are miaotui's packed low-bit ones (qmatmul) or bf16 tiles
// (tile_matmul), the cache is in the activations' dtype or int8; everything else takes the Python path.

struct Proj {
  c10::optional<Tensor> w, dm;  // low-bit codes (qmatmul), for fewer than tile_rows rows
  int64_t bits, group, n;
  c10::optional<Tensor> in_scale, bias;
  c10::optional<Tensor> tiles;  // the bf16 weight in tile order (tile_matmul), from tile_rows rows on
  int64_t tile_rows;

  Tensor operator()(const Tensor& x) const {
    Tensor y = tiles && (!w || x.size(0) >= tile_rows) ? tile_matmul(x, *tiles, n)
                                                        : qmatmul(x, *w, *dm, bits, group, n, in_scale, false);
    return bias ? y.add_(*bias) : y;
  }
};

struct LlamaLayer {
  Tensor ln1, ln2;  // RMSNorm weights before attention and before the MLP
  Proj qkv, o, gate_up, down;
  Tensor k_cache, v_cache;  // [blocks, block_size, Hkv, D]
  c10::optional<Tensor> k_scale, v_scale;  // int8 cache: [blocks, block_size, Hkv, 1] in the activations' dtype
  int64_t window;  // sliding window, 0 for none
};

// One token's keys (or values) [Hkv, D] into cache slot `slot`; an int8 cache takes one scale per head, amax / 127
// rounded to the scale's dtype first, and codes round(x / scale) clamped to +-127, as Attention._write computes.
template <typename T>
void write_kv(const T* x, const Tensor& cache, const c10::optional<Tensor>& scale, int64_t slot, int64_t Hkv,
              int64_t D) {
  if (!scale) {
    std::memcpy(cache.data_ptr<T>() + slot * Hkv * D, x, Hkv * D * sizeof(T));
    return;
  }
  int8_t* q = cache.data_ptr<int8_t>() + slot * Hkv * D;
  T* sc = scale->data_ptr<T>() + slot * Hkv;
  for (int64_t h = 0; h < Hkv; ++h) {
    float amax = 0.f;
    for (int64_t j = 0; j < D; ++j) amax = std::max(amax, std::abs(to_f(x[h * D + j])));
    sc[h] = from_f<T>(std::max(amax / 127.f, 1e-8f));
    const float s = to_f(sc[h]);
    for (int64_t j = 0; j < D; ++j)
      q[h * D + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(to_f(x[h * D + j]) / s))));
  }
}

struct LlamaStack {
  std::vector<LlamaLayer> layers;
  int64_t heads, kv_heads, head_dim;
  double eps, scale;

  // x [B, hidden]: one token per sequence; slots [B] their cache slots; tables/lens as for paged_attention.
  Tensor decode(const Tensor& x_, const Tensor& positions, const Tensor& slots, const Tensor& tables,
                const Tensor& lens, const Tensor& cos, const Tensor& sin) const {
    const int64_t H = heads, KV = kv_heads, D = head_dim, B = x_.size(0);
    check_cpu(slots, "slots");
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == B, "decode: one int64 slot per token");
    const int64_t* slot = slots.data_ptr<int64_t>();
    Tensor x = x_.contiguous();
    for (const LlamaLayer& l : layers) {
      TORCH_CHECK(l.k_cache.scalar_type() == (l.k_scale ? at::kChar : x.scalar_type()),
                  "decode: the cache must be int8 with scales, or in the activations' dtype");
      const int64_t rows = l.k_cache.numel() / (KV * D);
      Tensor qkv = l.qkv(rms_norm(x, l.ln1, eps));
      Tensor qk = qkv.narrow(1, 0, (H + KV) * D).view({B, H + KV, D});
      rope_(qk, positions, cos, sin);
      // this step's keys and values into their slots (the module path's Attention._write)
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(slot[b] >= 0 && slot[b] < rows, "decode: slot ", slot[b], " is outside the cache");
      DISPATCH_FLOAT(x.scalar_type(), "decode", [&] {
        const scalar_t* src = qkv.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* row = src + b * qkv.stride(0);
          write_kv(row + H * D, l.k_cache, l.k_scale, slot[b], KV, D);
          write_kv(row + (H + KV) * D, l.v_cache, l.v_scale, slot[b], KV, D);
        }
      });
      Tensor q = qkv.narrow(1, 0, H * D).view({B, H, D}).contiguous();
      Tensor attn = paged_attention(q, l.k_cache, l.v_cache, l.k_scale, l.v_scale, tables, lens, scale, l.window);
      x = x + l.o(attn.view({B, H * D}));
      x = x + l.down(gated_act(l.gate_up(rms_norm(x, l.ln2, eps)), false));
    }
    return x;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The index of each row's maximum (the first one, as torch.argmax; NaNs are never chosen): torch's CPU argmax
// walks a [32, 49152] logits matrix at ~1 ns an element, 1.9 ms of a batch-32 decode step.
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
      float best = -INFINITY;
      int64_t arg = 0, i = 0;
#if MIAOTUI_AVX512
      if (n >= 16) {  // per lane: the first maximum of its column; then the smallest index among the lanes' best
        __m512 vbest = _mm512_set1_ps(-INFINITY);
        __m512i varg = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                       14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        for (; i + 16 <= n && i + 16 <= INT32_MAX; i += 16) {
          const __m512 v = _mm512_loadu_ps(row + i);
          const __mmask16 better = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);
          vbest = _mm512_mask_mov_ps(vbest, better, v);
          varg = _mm512_mask_mov_epi32(varg, better, idx);
          idx = _mm512_add_epi32(idx, step);
        }
        alignas(64) float vals[16];
        alignas(64) int32_t args[16];
        _mm512_store_ps(vals, vbest);
        _mm512_store_si512(args, varg);
        arg = -1;
        for (int l = 0; l < 16; ++l)
          if (vals[l] > best || (vals[l] == best && args[l] < arg)) best = vals[l], arg = args[l];
        if (arg < 0) arg = 0;
      }
#endif
      for (; i < n; ++i)
        if (row[i] > best) best = row[i], arg = i;
      op[r] = arg;
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("avx512") = static_cast<bool>(MIAOTUI_AVX512);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim");
  m.def("gated_act", &gated_act, "act(gate) * up over a fused [gate | up] last dim (gelu_tanh or silu)");
  m.def("rope_", &rope_, "NEOX rotary embedding in place on [T, H, D]");
  m.def("argmax_rows", &argmax_rows, "index of each row's first maximum (float32 [rows, n])");
  m.def("paged_attention", &paged_attention, "one-token-per-sequence attention over the paged KV cache");
  m.attr("vnni") = qmatmul_fast();
  m.attr("amx") = qmatmul_amx();
  py::class_<Proj>(m, "Proj", "a projection's weights as qmatmul and tile_matmul take them")
      .def(py::init<c10::optional<Tensor>, c10::optional<Tensor>, int64_t, int64_t, int64_t, c10::optional<Tensor>,
                    c10::optional<Tensor>, c10::optional<Tensor>, int64_t>(),
           py::arg("w"), py::arg("dm"), py::arg("bits"), py::arg("group"), py::arg("n"), py::arg("in_scale"),
           py::arg("bias"), py::arg("tiles"), py::arg("tile_rows"));
  py::class_<LlamaLayer>(m, "LlamaLayer", "one Llama block's weights and KV cache")
      .def(py::init<Tensor, Tensor, Proj, Proj, Proj, Proj, Tensor, Tensor, c10::optional<Tensor>,
                    c10::optional<Tensor>, int64_t>(),
           py::arg("ln1"), py::arg("ln2"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"), py::arg("window"));
  py::class_<LlamaStack>(m, "LlamaStack", "a decode step through Llama blocks in one call")
      .def(py::init<std::vector<LlamaLayer>, int64_t, int64_t, int64_t, double, double>(), py::arg("layers"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"))
      .def("decode", &LlamaStack::decode, py::call_guard<py::gil_scoped_release>());
  m.def("qmatmul", &qmatmul, "x @ W^T for 4/8-bit packed weights, activations quantized to int8 per 32",
        py::arg("x"), py::arg("w"), py::arg("dm"), py::arg("bits"), py::arg("group"), py::arg("n"),
        py::arg("in_scale") = py::none(), py::arg("reference") = false);
  m.def("tile_matmul", &tile_matmul, "x @ W^T for a bf16 weight in AMX tile order", py::arg("x"), py::arg("tiles"),
        py::arg("n"));
}
