"""The peers, measured the same way on the same file and prompts: llama.cpp (through llama-cpp-python) and
Hugging Face transformers. Each is optional: `available()` says whether it is installed."""

from __future__ import annotations

import importlib.util
import time

import torch

from miaotui.bench.engine_bench import SAMPLED, BenchConfig
from miaotui.config import resolve_device
from miaotui.loader.sources import resolve


class LlamaCppBench:
    name = "llama.cpp"

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("llama_cpp") is not None

    def __init__(self, cfg: BenchConfig):
        from llama_cpp import Llama

        files = resolve(cfg.model)
        if files.kind != "gguf":
            raise RuntimeError("llama.cpp needs a GGUF file")
        start = time.perf_counter()
        self.llm = Llama(model_path=str(files.path), n_ctx=4096, n_batch=512, n_threads=torch.get_num_threads(),
                         verbose=False, seed=cfg.seed)
        self.load_seconds = time.perf_counter() - start
        self.eos = self.llm.token_eos()

    def _generate(self, prompt: list[int], n: int, sampled: bool = False) -> tuple[float, float, int]:
        self.llm.reset()
        start = time.perf_counter()
        first, count = None, 0
        # greedy, or SAMPLED's settings with its other samplers off (top-k 0 and min-p 0 are no-ops in llama.cpp)
        how = (dict(temp=SAMPLED["temperature"], top_p=SAMPLED["top_p"], top_k=0, min_p=0.0) if sampled
               else dict(temp=0.0, top_k=1))
        for _ in self.llm.generate(prompt, reset=True, **how):  # EOS ignored as by the others
            count += 1
            if first is None:
                first = time.perf_counter()
            if count >= n:
                break
        return start, first or start, count

    def decode(self, prompt: list[int], n: int, sampled: bool = False) -> float:
        _, first, count = self._generate(prompt, n, sampled)
        return (count - 1) / (time.perf_counter() - first)

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - start)

    def throughput(self, prompts: list[list[int]], n: int) -> float:
        """llama-cpp-python serves one sequence at a time: requests run back to back."""
        start, total = time.perf_counter(), 0
        for p in prompts:
            total += self._generate(p, n)[2]
        return total / (time.perf_counter() - start)


class TransformersBench:
    name = "transformers"

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("transformers") is not None

    def __init__(self, cfg: BenchConfig, dtype: torch.dtype = torch.float32):
        """`dtype`: the fastest this hardware multiplies natively (the one miaotui's `--dtype auto` picks): bf16
        where the CPU has bf16 units, else fp32 (torch's bf16 product is emulated there, ~500x slower)."""
        from transformers import AutoModelForCausalLM

        files = resolve(cfg.model)
        start = time.perf_counter()
        if files.kind == "gguf":
            self.model = AutoModelForCausalLM.from_pretrained(str(files.path.parent), gguf_file=files.path.name,
                                                              dtype=dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(files.path), dtype=dtype)
        self.device = resolve_device(cfg.engine.device)  # the device miaotui runs on
        self.model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - start
        self.name = f"transformers-{str(dtype).removeprefix('torch.')}"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], n: int, sampled: bool = False):
        ids = torch.tensor(prompts, device=self.device)
        how = dict(do_sample=True, top_k=0, **SAMPLED) if sampled else dict(do_sample=False)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=0, **how)
        self._sync()
        return out

    def decode(self, prompt: list[int], n: int, sampled: bool = False) -> float:
        start = time.perf_counter()
        self._generate([prompt], 1, sampled)
        first = time.perf_counter() - start
        start = time.perf_counter()
        self._generate([prompt], n, sampled)
        return (n - 1) / (time.perf_counter() - start - first)

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self.model(torch.tensor([prompt], device=self.device))
        self._sync()
        return len(prompt) / (time.perf_counter() - start)

    def throughput(self, prompts: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        out = self._generate(prompts, n)
        return (out.shape[1] - len(prompts[0])) * len(prompts) / (time.perf_counter() - start)
