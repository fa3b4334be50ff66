"""The cost of structured output, side by side in one run: 32 concurrent requests and one stream, constrained
against free with the same token counts (the schema cannot be completed within max_tokens; the free run ignores
EOS), medians of 3; then compile times of distinct schemas and of a cached one.
Usage: python scripts/bench_structured.py [MODEL]"""

from __future__ import annotations

import statistics
import sys
import time

from miaotui import LLM, SamplingParams, StructuredOutput

LONG = {"type": "array", "minItems": 100, "items": {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}}, "required": ["id", "name", "tags"]}}


def tokens_per_second(llm: LLM, prompts: list[str], max_tokens: int, constrained: bool) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=1, ignore_eos=True,
                            structured_output=StructuredOutput(json=LONG) if constrained else None)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    assert tokens == len(prompts) * max_tokens, tokens
    return tokens / seconds


def main(model: str) -> None:
    llm = LLM(model)
    prompts = [f"Record {i}: a list of users as JSON:" for i in range(32)]
    tokens_per_second(llm, prompts, 8, True)  # warm-up: kernels, the tokenizer's trie
    for n, max_tokens in ((32, 64), (1, 128)):
        free = statistics.median(tokens_per_second(llm, prompts[:n], max_tokens, False) for _ in range(3))
        constrained = statistics.median(tokens_per_second(llm, prompts[:n], max_tokens, True) for _ in range(3))
        print(f"{model} {n} x {max_tokens} tokens: free {free:.1f} tok/s, constrained {constrained:.1f} tok/s, "
              f"ratio {constrained / free:.3f}", flush=True)
    seconds = []
    for i in range(40):
        schema = {"type": "object", "required": [f"field_{i}_0"], "properties": {
            f"field_{i}_{j}": {"type": ["string", "integer", "boolean"][j % 3]} for j in range(8)}}
        start = time.perf_counter()
        llm.engine.grammars.compile(StructuredOutput(json=schema))
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    llm.engine.grammars.compile(StructuredOutput(json=schema))
    cached = time.perf_counter() - start
    seconds.sort()
    print(f"compile (8-field schema, 40 distinct): p50 {seconds[20] * 1e3:.2f} ms, p99 {seconds[-1] * 1e3:.2f} ms; "
          f"cached {cached * 1e3:.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
