"""One `ask(messages)` for the examples: through miaotui's Python API, or through a running `miaotui serve` with the
official openai client when --server is given."""

from __future__ import annotations

import argparse
from functools import lru_cache


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--server", default=None, help="base URL of a running `miaotui serve`, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=128)
    return p


@lru_cache(maxsize=1)
def _llm(model: str):
    from miaotui import LLM

    return LLM(model)


def ask(messages: list[dict], args: argparse.Namespace, temperature: float = 0.0) -> str:
    if args.server:
        from openai import OpenAI

        client = OpenAI(base_url=f"{args.server}/v1", api_key="unused")
        r = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                           temperature=temperature)
        return r.choices[0].message.content
    from miaotui import SamplingParams

    out = _llm(args.model).chat(messages, SamplingParams(max_tokens=args.max_tokens, temperature=temperature),
                                use_tqdm=False)
    return out[0].text
