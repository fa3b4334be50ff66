"""The async engine: concurrent streams give the same text as the offline API; a cancelled stream frees its
blocks within a step; a bad request fails alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from miaotui import SamplingParams
from miaotui.engine.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def async_engine(smollm2_engine):
    a = AsyncEngine(smollm2_engine)
    yield a
    a.shutdown()


async def collect(a: AsyncEngine, ids, params) -> tuple[str, str, int]:
    streamed, final = "", None
    async for out in a.generate(ids, params):
        streamed += out.delta
        final = out
    return streamed, final.text, final.completion_tokens


def test_concurrent_streams_match_offline(async_engine, smollm2_engine):
    tok = smollm2_engine.tokenizer
    prompts = [tok.encode(p) for p in ("The sun is", "Three plus four equals", "我喜欢")]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(async_engine, p, params) for p in prompts))

    results = asyncio.run(main())
    for p, (streamed, text, n) in zip(prompts, results):
        assert streamed == text and n == 16
        ref = tok.decode(_offline(smollm2_engine, async_engine, p, params))
        assert text == ref.rstrip("\ufffd")  # a cut-off multi-byte character is never emitted


def _offline(engine, async_engine, ids, params):
    async def one():
        toks = None
        async for out in async_engine.generate(ids, params):
            toks = out.token_ids
        return toks
    return asyncio.run(one())


def test_cancelled_stream_frees_blocks(async_engine, smollm2_engine):
    tok = smollm2_engine.tokenizer
    kv = smollm2_engine.kv

    async def main():
        chunks = 0
        async for _ in async_engine.generate(tok.encode("Tell me a long story."),
                                             SamplingParams(max_tokens=500, ignore_eos=True)):
            chunks += 1
            if chunks == 3:
                assert kv.num_free_blocks < kv.num_blocks
                break  # the client goes away

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while kv.num_free_blocks != kv.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kv.num_free_blocks == kv.num_blocks
    assert not smollm2_engine.has_unfinished()


def test_bad_request_fails_alone(async_engine, smollm2_engine):
    too_long = [100] * (smollm2_engine.max_model_len + 5)

    async def main():
        with pytest.raises(ValueError, match="context length"):
            await collect(async_engine, too_long, SamplingParams(max_tokens=4))
        return await collect(async_engine, smollm2_engine.tokenizer.encode("Hi"), SamplingParams(max_tokens=4))

    _, text, n = asyncio.run(main())
    assert n >= 1
