// A decode step through a stack of Llama blocks in one call. Each block is a dozen small ops at decode sizes; driven
// from Python they cost ~100 us a block in module calls and dispatch (3 ms of a 9 ms token on SmolLM2), more than
// their arithmetic. Here the same kernels run in the same order with the same roundings, so the result equals the
// module-by-module forward exactly. Weights are miaotui's packed low-bit ones (qmatmul) or bf16 tiles
// (tile_matmul), the cache is in the activations' dtype or int8. Built from the blocks' description by
// engine/fused.py.

#include "stack.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "vec.h"

using mt::BF16;

Tensor Proj::operator()(const Tensor& x) const {
  Tensor y = tiles && (!w || (x.size(0) >= tile_rows && !row_exact()))
                 ? tile_matmul(x, *tiles, n)
                 : qmatmul(x, *w, *dm, bits, group, n, in_scale, false, act_bits);
  return bias ? y.add_(*bias) : y;
}

namespace {

// One token's keys (or values) [Hkv, D] into cache slot `slot`; an int8 cache takes one scale per head, amax / 127
// rounded to the scale's dtype first, and codes round(x / scale) clamped to +-127, as attention/base.py's write_kv computes.
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
    for (int64_t j = 0; j < D; ++j) amax = std::max(amax, std::abs(mt::to_f(x[h * D + j])));
    sc[h] = mt::from_f<T>(std::max(amax / 127.f, 1e-8f));
    const float s = mt::to_f(sc[h]);
    for (int64_t j = 0; j < D; ++j)
      q[h * D + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(mt::to_f(x[h * D + j]) / s))));
  }
}

// x += y, rounded to T once from the float sum, as torch's `x + y` (a torch op here cost ~3 us of dispatch).
template <typename T>
void add_into(T* x, const T* y, int64_t n) {
  int64_t i = 0;
  for (; i + mt::W <= n; i += mt::W) mt::store(x + i, mt::load(x + i) + mt::load(y + i));
  for (; i < n; ++i) x[i] = mt::from_f<T>(mt::to_f(x[i]) + mt::to_f(y[i]));
}

void add_into(Tensor& x, const Tensor& y) {
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == x.scalar_type() && y.numel() == x.numel(),
              "decode: a residual of another shape or dtype");
  if (x.scalar_type() == at::kFloat) add_into(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  else add_into(x.data_ptr<BF16>(), y.data_ptr<BF16>(), x.numel());
}

}  // namespace

Tensor LlamaStack::decode(const Tensor& x_, const Tensor& positions, const Tensor& slots, const Tensor& tables,
                          const Tensor& lens, const Tensor& cos, const Tensor& sin) const {
  const int64_t H = heads, KV = kv_heads, D = head_dim, B = x_.size(0);
  TORCH_CHECK(slots.device().is_cpu() && slots.is_contiguous() && slots.scalar_type() == at::kLong &&
              slots.numel() == B, "decode: one int64 slot per token, a contiguous CPU tensor");
  const int64_t* slot = slots.data_ptr<int64_t>();
  Tensor x = x_.clone(at::MemoryFormat::Contiguous);  // the residual stream, added to in place
  Tensor h = at::empty(x.sizes(), x.options());  // each norm's output: one allocation a step, not two a layer
  for (const LlamaLayer& l : layers) {
    TORCH_CHECK(l.k_cache.scalar_type() == (l.k_scale ? at::kChar : x.scalar_type()),
                "decode: the cache must be int8 with scales, or in the activations' dtype");
    const int64_t rows = l.k_cache.numel() / (KV * D);
    rms_norm_out(x, l.ln1, eps, h);
    Tensor qkv = l.qkv(h);
    rope_rows_(qkv, H + KV, D, positions, cos, sin);
    // this step's keys and values into their slots (the module path's write_kv)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(slot[b] >= 0 && slot[b] < rows, "decode: slot ", slot[b], " is outside the cache");
    auto write = [&](auto* src) {
      for (int64_t b = 0; b < B; ++b) {
        const auto* row = src + b * qkv.stride(0);
        write_kv(row + H * D, l.k_cache, l.k_scale, slot[b], KV, D);
        write_kv(row + (H + KV) * D, l.v_cache, l.v_scale, slot[b], KV, D);
      }
    };
    if (x.scalar_type() == at::kFloat) write(qkv.data_ptr<float>());
    else write(qkv.data_ptr<BF16>());
    Tensor attn = paged_attention_rows(qkv, H, l.k_cache, l.v_cache, l.k_scale, l.v_scale, tables, lens, scale,
                                       l.window);
    add_into(x, l.o(attn));
    rms_norm_out(x, l.ln2, eps, h);
    add_into(x, l.down(gated_act(l.gate_up(h), false)));
  }
  return x;
}
