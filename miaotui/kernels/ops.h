// The kernels' entry points, shared by the translation units (ops.cpp, qmatmul.cpp, attention.cpp, stack.cpp,
// bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

using at::Tensor;

// ops.cpp
Tensor rms_norm(const Tensor& x, const Tensor& w, double eps);
void rms_norm_out(const Tensor& x, const Tensor& w, double eps, Tensor& y);  // into y, of x's shape
Tensor gated_act(const Tensor& x, bool gelu);
void rope_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin);
// The same on the first `heads` heads of D values of each row of a 2-D [T, >= heads * D] tensor (q|k of a fused qkv
// output, with no view made of it: the decode stack ran 30 layers' narrow-and-view ops at 1-2 us each).
void rope_rows_(Tensor& rows, int64_t heads, int64_t D, const Tensor& positions, const Tensor& cos, const Tensor& sin);
Tensor paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale,
                       const Tensor& block_tables, const Tensor& context_lens, double scale, int64_t window);
// The same with the queries the first `heads` heads of each row of a 2-D tensor (a fused qkv output); the output
// rows [B, heads * D].
Tensor paged_attention_rows(const Tensor& rows, int64_t heads, const Tensor& k_cache, const Tensor& v_cache,
                            const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale,
                            const Tensor& block_tables, const Tensor& context_lens, double scale, int64_t window);
Tensor argmax_rows(const Tensor& x);
std::tuple<Tensor, Tensor> topk_rows(const Tensor& x, int64_t k);
Tensor dense_matmul(const Tensor& x, const Tensor& w);

// attention.cpp
bool prefill_attention_available();  // AVX512-BF16 and VBMI in this build and CPU
Tensor prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t length, double scale);

// qmatmul.cpp
const char* qmatmul_path();  // the integer kernel this build runs: "vnni", "avx2" or "generic"
bool qmatmul_amx();
bool qmatmul_bf16_gemm();  // prefill-sized bf16 products on `vdpbf16ps` (CPUs with bf16 units and VBMI, no AMX)
// From how many rows a product of `bits`-bit codes under `act_bits` activations is taken in fp32 (0: never; AMX
// tiles and the bf16 GEMM above are asked about separately).
int64_t qmatmul_fp32_rows(int64_t bits, int64_t group, int64_t act_bits);
Tensor qmatmul(const Tensor& x, const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t N,
               const c10::optional<Tensor>& in_scale, bool reference, int64_t act_bits);
Tensor tile_matmul(const Tensor& x, const Tensor& tiles, int64_t N);
// While set (per thread: the one that calls the products), every product of packed codes takes a lone row's
// arithmetic at any row count — the integer kernel, never the tiles or a prompt-sized float product — so a step's
// rows give the logits one-row steps give. The runner sets it for steps that score speculative proposals.
bool row_exact();
bool set_row_exact(bool on);  // returns the previous setting
Tensor packed_rows(const Tensor& w, const Tensor& dm, int64_t bits, int64_t group, int64_t K, const Tensor& ids);
std::tuple<Tensor, Tensor, int64_t> pack_blocks(const Tensor& raw, const std::string& type, int64_t N, int64_t K,
                                                const c10::optional<Tensor>& rows, int64_t out_bits,
                                                const c10::optional<Tensor>& data_out,
                                                const c10::optional<Tensor>& dm_out, bool kscales);
