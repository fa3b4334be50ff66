// Low-bit weight x activation products on integer dot-product units (AVX-512 VNNI): the activations are quantized
// to int8 in blocks of 32, as llama.cpp does, plus a second int8 term for the rounding residual, and each 4-byte
// group of weight codes meets 4 activation bytes in one `vpdpbusd`.
//
// Weights are unsigned codes with an affine map per (row, group): w = d * q + m, where q is 4-bit (0..15; GGUF
// Q4_1 stores exactly this) or 8-bit (0..255: a symmetric int8 weight w = s * c is q = c + 128, d = s, m = -128 s).
// With activations x ~ dx * xq (two int8 terms, see QuantX), a group's contribution is d * Σ_blocks dx * Σ q xq
// + m * Σ x: the integer sums run on VNNI, the second term needs only the sum of the activations.
//
// Layout (packed once in Python, miaotui/quant/packed.py): rows in blocks of 16, one 64-byte line per
// (row block, input chunk) holding 16 rows x 4 bytes, so one vector load feeds one `vpdpbusd` for 16 outputs.
//   4-bit: chunks of 8 inputs; byte 4r+j holds input j in its low nibble and input j+4 in its high nibble.
//   8-bit: chunks of 4 inputs; byte 4r+j holds input j.
// Scales: fp16 [row blocks, groups, 2, 16] (d then m for 16 rows), exact for GGUF's fp16 block scales.
//
// From 8 rows on (prefill, batched decode), where the CPU has AMX, the same layout is widened to bf16 instead and
// multiplied on the tile unit (see "Many rows" below).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MIAOTUI_VNNI 1
#else
#define MIAOTUI_VNNI 0
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
// plain sum reads 44 GB/s), so each line also asks for the one this many bytes ahead.
constexpr int64_t PREFETCH = 2048;

// Activations quantized in two int8 terms, x = d * q + (d / 256) * r: q rounds x at the block's scale and r rounds
// what is left (at most half a step) at a 256x finer one, so x keeps ~15 bits and the products stay on VNNI. With
// one term (llama.cpp's Q8 activations) an outlier coarsens its whole block: +0.5% perplexity on SmolLM2.
// gsum: per weight group, the exact sum of x, for the m term.
struct QuantX {
  std::vector<int8_t> q;
  std::vector<int8_t> r;
  std::vector<float> d;
  std::vector<float> gsum;
};
constexpr float RESIDUAL = 256.f;  // a power of two: the two integer sums combine by a shift

#if MIAOTUI_VNNI
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// in_scale (S: fp32 or bf16, as the weight stores it) multiplies x first, when given.
template <typename T, typename S>
void quantize_rows(const T* x, const S* in_scale, int64_t M, int64_t K, int64_t group, int8_t* q, int8_t* r,
                   float* d, float* gsum) {
  const int64_t nb = K / QBLOCK, gb = group / QBLOCK;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    float buf[QBLOCK];
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const T* xb = x + m * K + b * QBLOCK;
        int8_t* qb = q + m * K + b * QBLOCK;
        int8_t* rb = r + m * K + b * QBLOCK;
        if (b % gb == 0) gsum[m * (K / group) + b / gb] = 0.f;
#if MIAOTUI_VNNI
        {  // the same arithmetic as the scalar loop below, 16 lanes at a time
          __m512 v[2] = {load16f(xb), load16f(xb + 16)};
          if (in_scale)
            for (int h = 0; h < 2; ++h) v[h] = _mm512_mul_ps(v[h], load16f(in_scale + b * QBLOCK + 16 * h));
          float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
          const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
          for (int h = 0; h < 2; ++h) {
            __m512 t = _mm512_mul_ps(v[h], inv);
            __m512 c = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512 res = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, c), _mm512_set1_ps(RESIDUAL)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            res = _mm512_max_ps(_mm512_min_ps(res, _mm512_set1_ps(127.f)), _mm512_set1_ps(-127.f));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16 * h), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(c)));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(rb + 16 * h), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(res)));
          }
          d[m * nb + b] = amax / 127.f;
          gsum[m * (K / group) + b / gb] += _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
          continue;
        }
#endif
        float amax = 0.f;
        for (int64_t i = 0; i < QBLOCK; ++i) {
          float v = static_cast<float>(xb[i]);
          if (in_scale) v *= static_cast<float>(in_scale[b * QBLOCK + i]);
          buf[i] = v;
          amax = std::max(amax, std::fabs(v));
        }
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f, sum = 0.f;
        for (int64_t i = 0; i < QBLOCK; ++i) {
          float c = std::nearbyint(buf[i] * inv);
          qb[i] = static_cast<int8_t>(c);
          rb[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint((buf[i] * inv - c) * RESIDUAL))));
          sum += buf[i];
        }
        d[m * nb + b] = scale;
        gsum[m * (K / group) + b / gb] += sum;
      }
    }
  });
}

template <typename T>
inline void store_row(T* y, int64_t n, const float* v) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(v[i]);
}

#if MIAOTUI_VNNI
// One block of 16 output rows for MT tokens: every weight line is loaded (and unpacked) once for all MT tokens.
template <int Bits, int MT, typename T>
inline void qgemm_block(const uint8_t* w, const at::Half* dm, const int8_t* xq, const int8_t* xr, const float* xd,
                        const float* gs,
                        int64_t K, int64_t group, T* y, int64_t ldy, int64_t rows) {
  const int64_t ngroups = K / group, blocks_per_group = group / QBLOCK, nb = K / QBLOCK;
  constexpr int chunks = Bits == 4 ? 4 : 8;  // 64-byte lines per block of 32 inputs
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512 fd[MT];
    for (int t = 0; t < MT; ++t) fd[t] = _mm512_setzero_ps();
    for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
      const int64_t b = g * blocks_per_group + bb;
      // Two accumulators per term: consecutive vpdpbusd on one register would wait on each other's latency.
      __m512i qs[MT][2], rs[MT][2];
      for (int t = 0; t < MT; ++t) qs[t][0] = qs[t][1] = rs[t][0] = rs[t][1] = _mm512_setzero_si512();
      for (int c = 0; c < chunks; ++c) {
        __m512i line = _mm512_loadu_si512(w);
        _mm_prefetch(reinterpret_cast<const char*>(w) + PREFETCH, _MM_HINT_T0);
        w += 64;
        if (Bits == 4) {
          __m512i lo = _mm512_and_si512(line, low4);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(line, 4), low4);
          for (int t = 0; t < MT; ++t) {
            const int64_t off = t * K + b * QBLOCK + c * 8;
            const int32_t* xp = reinterpret_cast<const int32_t*>(xq + off);
            const int32_t* rp = reinterpret_cast<const int32_t*>(xr + off);
            qs[t][0] = _mm512_dpbusd_epi32(qs[t][0], lo, _mm512_set1_epi32(xp[0]));
            qs[t][1] = _mm512_dpbusd_epi32(qs[t][1], hi, _mm512_set1_epi32(xp[1]));
            rs[t][0] = _mm512_dpbusd_epi32(rs[t][0], lo, _mm512_set1_epi32(rp[0]));
            rs[t][1] = _mm512_dpbusd_epi32(rs[t][1], hi, _mm512_set1_epi32(rp[1]));
          }
        } else {
          for (int t = 0; t < MT; ++t) {
            const int64_t off = t * K + b * QBLOCK + c * 4;
            qs[t][c & 1] = _mm512_dpbusd_epi32(qs[t][c & 1], line,
                                               _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq + off)));
            rs[t][c & 1] = _mm512_dpbusd_epi32(rs[t][c & 1], line,
                                               _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xr + off)));
          }
        }
      }
      for (int t = 0; t < MT; ++t) {  // q * 256 + r fits int32: |Σ| <= 32 * 255 * 127 * 257
        __m512i q = _mm512_add_epi32(qs[t][0], qs[t][1]), r = _mm512_add_epi32(rs[t][0], rs[t][1]);
        __m512i both = _mm512_add_epi32(_mm512_slli_epi32(q, 8), r);
        fd[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(both), _mm512_set1_ps(xd[t * nb + b] / RESIDUAL), fd[t]);
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + g * 32)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + g * 32 + 16)));
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

template <int Bits, typename T>
void qgemm_rows(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                int64_t N, T* y, int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group, nb = K / QBLOCK;
  constexpr int TILE = 4;
  for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
    const uint8_t* wb = w + rb * line_bytes;
    const at::Half* dmb = dm + rb * ngroups * 32;
    const int64_t rows = std::min<int64_t>(16, N - rb * 16);
    int64_t m = 0;
    auto args = [&](int64_t m0) {
      return std::make_tuple(x.q.data() + m0 * K, x.r.data() + m0 * K, x.d.data() + m0 * nb,
                             x.gsum.data() + m0 * ngroups);
    };
    for (; m + TILE <= M; m += TILE) {
      auto [q, r, d, gs] = args(m);
      qgemm_block<Bits, TILE>(wb, dmb, q, r, d, gs, K, group, y + m * N + rb * 16, N, rows);
    }
    for (; m < M; ++m) {
      auto [q, r, d, gs] = args(m);
      qgemm_block<Bits, 1>(wb, dmb, q, r, d, gs, K, group, y + m * N + rb * 16, N, rows);
    }
  }
}
#endif

// Plain C++ (any CPU): the same arithmetic, one output at a time, for the tests to check the VNNI path against
// (`reference=True`). Without VNNI, packed.py keeps weights in torch's layouts instead: this is too slow to serve.
template <int Bits, typename T>
void qgemm_rows_ref(const uint8_t* w, const at::Half* dm, const QuantX& x, int64_t M, int64_t K, int64_t group,
                    int64_t N, T* y, int64_t rb_begin, int64_t rb_end) {
  const int64_t line_bytes = 16 * K * Bits / 8, ngroups = K / group, nb = K / QBLOCK;
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
          const at::Half* dmg = dm + (rb * ngroups + g) * 32;
          acc += fd * static_cast<float>(dmg[r]) + static_cast<float>(dmg[16 + r]) * x.gsum[m * ngroups + g];
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

// The weight's 16 rows starting at `w` as bf16 tiles for `tdpbf16ps`: per block of 32 inputs, 16 lines of 64 bytes,
// line p holding inputs 2p and 2p+1 of each of the 16 rows.
template <int Bits>
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
  for (int64_t b = 0; b < K / QBLOCK; ++b) {
    if (b * QBLOCK % group == 0) {
      const at::Half* g = dm + b * QBLOCK / group * 32;
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 16)));
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
void amx_gemm(const uint8_t* w, const at::Half* dm, int bits, const at::BFloat16* x, int64_t M, int64_t K,
              int64_t group, int64_t N, T* y) {
  const int64_t line_bytes = 16 * K * bits / 8, ngroups = K / group, rblocks = (N + 15) / 16;
  auto panel = [&](int64_t p, at::BFloat16* buf) -> const at::BFloat16* {
    for (int64_t s = 0; s < std::min<int64_t>(2, rblocks - 2 * p); ++s) {
      const int64_t rb = 2 * p + s;
      if (bits == 4) widen_rows<4>(w + rb * line_bytes, dm + rb * ngroups * 32, K, group, buf + s * 16 * K);
      else widen_rows<8>(w + rb * line_bytes, dm + rb * ngroups * 32, K, group, buf + s * 16 * K);
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
        __m512 lo = load16f(src), hi = load16f(src + 16);
        if (in_scale) {
          lo = _mm512_mul_ps(lo, load16f(in_scale + k));
          hi = _mm512_mul_ps(hi, load16f(in_scale + k + 16));
        }
        _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // round to nearest even, as at::BFloat16
      }
    }
  });
  return out_;
}
#endif

}  // namespace

bool qmatmul_fast() { return MIAOTUI_VNNI; }

bool qmatmul_amx() {
#if MIAOTUI_AMX
  return amx_ready();
#else
  return false;
#endif
}

// y [M, N] = x [M, K] (fp32 or bf16; times in_scale [K] first when given) @ W^T, W packed as described above.
Tensor qmatmul(const Tensor& x_, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t N,
               const c10::optional<Tensor>& in_scale_, bool reference) {
  Tensor x = x_.contiguous();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && dm.device().is_cpu(), "qmatmul: CPU tensors only");
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul: 4 or 8 bits");
  TORCH_CHECK(w.scalar_type() == at::kByte && dm.scalar_type() == at::kHalf, "qmatmul: uint8 codes, fp16 scales");
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK(group % QBLOCK == 0 && K % group == 0, "qmatmul: K must split into groups of a multiple of 32");
  const int64_t rblocks = (N + 15) / 16;
  TORCH_CHECK(w.numel() == rblocks * 16 * K * bits / 8, "qmatmul: packed weight does not match K and N");
  TORCH_CHECK(dm.numel() == rblocks * (K / group) * 32, "qmatmul: scales do not match K, N and the group");
  Tensor in_scale;
  if (in_scale_.has_value()) {  // taken in its own dtype when fp32 or bf16: no conversion per call
    in_scale = in_scale_->contiguous();
    if (in_scale.scalar_type() != at::kFloat && in_scale.scalar_type() != at::kBFloat16)
      in_scale = in_scale.to(at::kFloat);
    TORCH_CHECK(in_scale.numel() == K, "qmatmul: in_scale must have K elements");
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  Tensor y = at::empty(shape, x.options());
  auto run = [&](auto* xp, auto* yp) {
#if MIAOTUI_AMX
    if (!reference && M >= AMX_MIN_ROWS && amx_ready()) {
      Tensor xb;
      if (!in_scale.defined()) xb = amx_rows(xp, static_cast<const float*>(nullptr), M, K);
      else if (in_scale.scalar_type() == at::kBFloat16) xb = amx_rows(xp, in_scale.data_ptr<at::BFloat16>(), M, K);
      else xb = amx_rows(xp, in_scale.data_ptr<float>(), M, K);
      amx_gemm(w.data_ptr<uint8_t>(), dm.data_ptr<at::Half>(), bits, xb.data_ptr<at::BFloat16>(), M, K, group, N, yp);
      return;
    }
#endif
    QuantX qx{std::vector<int8_t>(M * K), std::vector<int8_t>(M * K), std::vector<float>(M * K / QBLOCK),
              std::vector<float>(M * K / group)};
    auto quantize = [&](auto* sp) {
      quantize_rows(xp, sp, M, K, group, qx.q.data(), qx.r.data(), qx.d.data(), qx.gsum.data());
    };
    if (!in_scale.defined()) quantize(static_cast<const float*>(nullptr));
    else if (in_scale.scalar_type() == at::kBFloat16) quantize(in_scale.data_ptr<at::BFloat16>());
    else quantize(in_scale.data_ptr<float>());
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const at::Half* dp = dm.data_ptr<at::Half>();
    at::parallel_for(0, rblocks, 1, [&](int64_t b0, int64_t b1) {
#if MIAOTUI_VNNI
      if (!reference) {
        if (bits == 4) qgemm_rows<4>(wp, dp, qx, M, K, group, N, yp, b0, b1);
        else qgemm_rows<8>(wp, dp, qx, M, K, group, N, yp, b0, b1);
        return;
      }
#endif
      if (bits == 4) qgemm_rows_ref<4>(wp, dp, qx, M, K, group, N, yp, b0, b1);
      else qgemm_rows_ref<8>(wp, dp, qx, M, K, group, N, yp, b0, b1);
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
