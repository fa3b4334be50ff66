// The decode stack's types (stack.cpp), for the bindings.
#pragma once

#include <vector>

#include "ops.h"

struct Proj {
  c10::optional<Tensor> w, dm;  // low-bit codes (qmatmul), for fewer than tile_rows rows
  int64_t bits, group, n;
  c10::optional<Tensor> in_scale, bias;
  c10::optional<Tensor> tiles;  // the bf16 weight in tile order (tile_matmul), from tile_rows rows on
  int64_t tile_rows;
  int64_t act_bits;  // qmatmul's activations: 16 (two int8 terms) or 8 (one)

  Tensor operator()(const Tensor& x) const;
};

struct LlamaLayer {
  Tensor ln1, ln2;  // RMSNorm weights before attention and before the MLP
  Proj qkv, o, gate_up, down;
  Tensor k_cache, v_cache;  // [blocks, block_size, Hkv, D]
  c10::optional<Tensor> k_scale, v_scale;  // int8 cache: [blocks, block_size, Hkv, 1] in the activations' dtype
  int64_t window;  // sliding window, 0 for none
};

struct LlamaStack {
  std::vector<LlamaLayer> layers;
  int64_t heads, kv_heads, head_dim;
  double eps, scale;

  // x [B, hidden]: one token per sequence; slots [B] their cache slots; tables/lens as for paged_attention.
  Tensor decode(const Tensor& x, const Tensor& positions, const Tensor& slots, const Tensor& tables,
                const Tensor& lens, const Tensor& cos, const Tensor& sin) const;
};
