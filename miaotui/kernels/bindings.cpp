// The Python module: every kernel of ops.cpp, qmatmul.cpp, attention.cpp and stack.cpp, and what this build runs on.
// Only pybind11 and torch's tensor type casters are included (torch/extension.h, the whole C++ frontend, took 43 s of
// the build here; this file now ~18 s), so a first run waits less for its kernels. The classes are module-local:
// each CPU class's build is its own module, and a process (the tests) may load several.

#include <torch/csrc/utils/pybind.h>

#include "ops.h"
#include "stack.h"
#include "vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("vector_width") = mt::W;  // floats per vector in ops.cpp: 16 (AVX-512) or 8 (AVX2, portable C++)
  m.attr("qmatmul_path") = qmatmul_path();
  m.attr("amx") = qmatmul_amx();
  m.attr("bf16_gemm") = qmatmul_bf16_gemm();
  m.def("fp32_rows", &qmatmul_fp32_rows, "from how many rows a product is taken in fp32 (0: never)", py::arg("bits"),
        py::arg("group") = 32, py::arg("act_bits") = 16);
  m.def("row_exact", &row_exact, "whether this thread's products take a lone row's arithmetic at any row count");
  m.def("set_row_exact", &set_row_exact, "set it for this thread; returns the previous setting", py::arg("on"));
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim");
  m.def("gated_act", &gated_act, "act(gate) * up over a fused [gate | up] last dim (gelu_tanh or silu)");
  m.def("rope_", &rope_, "NEOX rotary embedding in place on [T, H, D]");
  m.def("argmax_rows", &argmax_rows, "index of each row's first maximum (float32 [rows, n])");
  m.def("topk_rows", &topk_rows, "each row's k largest values and indices, largest first (float32 [rows, n])");
  m.def("dense_matmul", &dense_matmul, "x @ w^T for float32 x [M, K] with few rows and w [N, K]");
  m.def("paged_attention", &paged_attention, "one-token-per-sequence attention over the paged KV cache");
  m.attr("prefill_attention_available") = prefill_attention_available();
  m.def("prefill_attention", &prefill_attention, "causal attention over fresh prompts of `length` tokens (bf16)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("length"), py::arg("scale"));
  m.def("qmatmul", &qmatmul, "x @ W^T for 4/8-bit packed weights, activations quantized to int8 per 32",
        py::arg("x"), py::arg("w"), py::arg("dm"), py::arg("bits"), py::arg("group"), py::arg("n"),
        py::arg("in_scale") = py::none(), py::arg("reference") = false, py::arg("act_bits") = 16);
  m.def("pack_blocks", &pack_blocks, "GGUF blocks [N, K] straight into the packed layout: (data, dm, bits)",
        py::arg("raw"), py::arg("type"), py::arg("n"), py::arg("k"), py::arg("rows") = py::none(),
        py::arg("bits") = 0, py::arg("data_out") = py::none(), py::arg("dm_out") = py::none(),
        py::arg("kscales") = false);
  m.def("packed_rows", &packed_rows, "rows ids of a packed weight as float32 [n, K] (an embedding lookup)",
        py::arg("w"), py::arg("dm"), py::arg("bits"), py::arg("group"), py::arg("k"), py::arg("ids"));
  m.def("tile_matmul", &tile_matmul, "x @ W^T for a bf16 weight in AMX tile order", py::arg("x"), py::arg("tiles"),
        py::arg("n"));
  py::class_<Proj>(m, "Proj", "a projection's weights as qmatmul and tile_matmul take them", py::module_local())
      .def(py::init<c10::optional<Tensor>, c10::optional<Tensor>, int64_t, int64_t, int64_t, c10::optional<Tensor>,
                    c10::optional<Tensor>, c10::optional<Tensor>, int64_t, int64_t>(),
           py::arg("w"), py::arg("dm"), py::arg("bits"), py::arg("group"), py::arg("n"), py::arg("in_scale"),
           py::arg("bias"), py::arg("tiles"), py::arg("tile_rows"), py::arg("act_bits"));
  py::class_<LlamaLayer>(m, "LlamaLayer", "one Llama block's weights and KV cache", py::module_local())
      .def(py::init<Tensor, Tensor, Proj, Proj, Proj, Proj, Tensor, Tensor, c10::optional<Tensor>,
                    c10::optional<Tensor>, int64_t>(),
           py::arg("ln1"), py::arg("ln2"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"), py::arg("window"));
  py::class_<LlamaStack>(m, "LlamaStack", "a decode step through Llama blocks in one call", py::module_local())
      .def(py::init<std::vector<LlamaLayer>, int64_t, int64_t, int64_t, double, double>(), py::arg("layers"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"))
      .def("decode", &LlamaStack::decode, py::call_guard<py::gil_scoped_release>());
}
