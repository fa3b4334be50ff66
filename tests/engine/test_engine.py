"""The engine on real models (fp32): batching, chunked prefill, prefix caching and preemption never change greedy
output; seeded sampling does not depend on the batch; stop strings and logprobs are right; no block leaks."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from miaotui import SamplingParams
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from miaotui.loader import load
from tests.conftest import model_path

PROMPTS = ["The quick brown fox", "In 1969, the first humans", "def quicksort(arr):", "日本の首都は",
           "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make " * 3]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# The engine's mechanics on both block kinds: Llama (SmolLM2) and Gemma 3 (sliding windows, its own norms). Qwen2
# is a Llama block with biases on q/k/v, and these tests run dense fp32 weights, where it adds nothing the two do
# not cover but four minutes of a 0.5B model; the model tests (test_reference, test_golden, test_quantize) hold
# Qwen's own path to transformers and to its files' codes.
ENGINE_MODELS = ["smollm2-135m", "gemma3-270m"]


@pytest.fixture(scope="module", params=ENGINE_MODELS)
def loaded(request):
    return load(str(model_path(request.param)), "cpu", __import__("torch").float32)


def make(loaded, **kw) -> Engine:
    """Dense fp32 weights: these tests hold the engine's mechanics to exact arithmetic (the low-bit formats'
    integer kernels round activations to ~15 bits, which moves logprobs by ~1e-4; test_quantize.py checks them)."""
    kw.setdefault("kv_cache_memory", 64 * 2**20)
    kw.setdefault("quantization", "none")
    return Engine(EngineConfig(model=str(loaded.files.path), dtype="float32", **kw), loaded=loaded)


def run_all(engine: Engine, prompts: list[list[int]], params) -> list[list[int]]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return [done[i].token_ids for i in ids]


def one_at_a_time(engine: Engine, prompts, params) -> list[list[int]]:
    return [run_all(engine, [p], params)[0] for p in prompts]


@pytest.fixture(scope="module")
def reference(loaded):
    engine = make(loaded, enable_prefix_caching=False)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    return prompts, one_at_a_time(engine, prompts, GREEDY)


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 7},  # chunked prefill beside running decodes
    {"enable_prefix_caching": False},
    {"max_num_seqs": 2},
], ids=["default", "chunked", "no-prefix-cache", "two-at-a-time"])
def test_batched_greedy_equals_one_at_a_time(loaded, reference, options):
    prompts, expected = reference
    engine = make(loaded, **options)
    assert run_all(engine, prompts, GREEDY) == expected


def test_equal_length_prompts_batched_in_one_attention_call(loaded, reference):
    """Fresh prompts of one length in one step share a single causal attention call (attention/base.py,
    `_prefill_fresh`), beside prompts of other lengths: the same greedy output as one at a time."""
    prompts, _ = reference
    same = [(p + prompts[-1])[:9] for p in prompts[:4]]  # four prompts of 9 tokens, then two others
    batch = same + [prompts[-1], prompts[0]]
    expected = one_at_a_time(make(loaded, enable_prefix_caching=False), batch, GREEDY)
    assert run_all(make(loaded, enable_prefix_caching=False), batch, GREEDY) == expected


def test_preemption_keeps_greedy_output(loaded, reference):
    prompts, expected = reference
    cfg = loaded.config
    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
    engine = make(loaded, kv_cache_memory=per_block * 12, max_model_len=192)  # 12 blocks for 5 sequences
    assert run_all(engine, prompts, GREEDY) == expected
    assert engine.scheduler.num_preemptions > 0
    with pytest.raises(ValueError, match="200 tokens, the KV cache holds 192"):  # could only ever preempt itself
        make(loaded, kv_cache_memory=per_block * 12, max_model_len=256).add_request(list(range(1, 201)), GREEDY)


def test_prefix_cache_skips_shared_prefill(loaded):
    engine = make(loaded)
    tok = engine.tokenizer
    shared = tok.encode("Once upon a time in a land far away " * 120)[:1000]
    assert len(shared) == 1000
    run_all(engine, [shared + tok.encode(" the end")], SamplingParams(max_tokens=2, temperature=0))
    rid = engine.add_request(shared + tok.encode(" and then"), SamplingParams(max_tokens=2, temperature=0))
    seq = engine.sequences[rid][0]
    engine.step()
    assert seq.num_cached_prompt == 1000 // 16 * 16
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_seeded_sampling_independent_of_batch(loaded):
    engine = make(loaded)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = run_all(engine, [prompts[0]], seeded)[0]
    others = SamplingParams(max_tokens=20, temperature=1.0)
    mixed = run_all(engine, prompts, [seeded] + [others] * 4)[0]
    assert alone == mixed
    assert run_all(engine, [prompts[0]], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99))[0] \
        != alone


def test_stop_strings_and_stop_tokens(loaded):
    engine = make(loaded)
    prompt = engine.tokenizer.encode("1, 2, 3, 4, 5,")
    full = engine.tokenizer.decode(run_all(engine, [prompt], SamplingParams(max_tokens=16, temperature=0))[0])
    stop = full.strip()[2:5]  # a piece of the continuation, spanning tokens
    rid = engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0, stop=[stop]))
    text, reason, streamed = "", None, ""
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.delta
            text, reason = out.text, (out.finish_reason, out.stop_reason)
    assert reason == ("stop", stop)
    assert stop not in text and full.startswith(text) and streamed == text
    first = run_all(engine, [prompt], SamplingParams(max_tokens=16, temperature=0))[0][2]
    out = run_all(engine, [prompt], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[first]))[0]
    assert out[-1] == first and len(out) == 3
    del rid
    kept = run_text(engine, prompt, SamplingParams(max_tokens=16, temperature=0, stop=[stop],
                                                   include_stop_str_in_output=True))
    assert kept.endswith(stop) and full.startswith(kept) and stop not in kept[:-1]
    kept = run_text(engine, prompt, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[first],
                                                   include_stop_str_in_output=True))
    assert kept == engine.tokenizer.decode(out)


def run_text(engine: Engine, prompt: list[int], params: SamplingParams) -> str:
    engine.add_request(prompt, params)
    text = ""
    while engine.has_unfinished():
        text = "".join([text, *(o.delta for o in engine.step())])
    return text


def test_min_tokens_holds_off_every_stop(loaded):
    """A stop token first met at output position j ends the answer there; with min_tokens past j the token is
    banned until then (nothing else changes before it), and a stop string met early does not end the answer."""
    engine = make(loaded)
    prompt = engine.tokenizer.encode("1, 2, 3, 4, 5,")
    plain = run_all(engine, [prompt], SamplingParams(max_tokens=16, temperature=0))[0]
    j = next(j for j in range(3, 16) if plain[j] not in plain[:j])
    stop = plain[j]
    ended = run_all(engine, [prompt], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop]))[0]
    assert ended == plain[: j + 1]
    longer = run_all(engine, [prompt], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop],
                                                      min_tokens=j + 4))[0]
    assert longer[:j] == plain[:j] and stop not in longer[: j + 4] and len(longer) >= j + 4
    word = engine.tokenizer.decode(plain[:2])
    held = run_all(engine, [prompt], SamplingParams(max_tokens=12, temperature=0, min_tokens=8, stop=[word]))[0]
    assert held[:8] == plain[:8] and len(held) >= 8


def test_logprobs(loaded):
    import torch

    engine = make(loaded)
    prompt = engine.tokenizer.encode("The capital of France is")
    rid = engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=5))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    final = outs[-1]
    assert final.request_id == rid and len(final.logprobs) == 3
    logits = engine.prompt_logits(prompt + final.token_ids[:2])
    for i, lp in enumerate(final.logprobs):
        expected = torch.log_softmax(logits[len(prompt) - 1 + i], -1)
        assert lp.token_id == final.token_ids[i] == int(expected.argmax())
        assert abs(lp.logprob - float(expected[lp.token_id])) < 1e-4
        top = expected.topk(5)
        assert list(lp.top)[:5] == top.indices.tolist()


def test_prompt_logprobs(loaded):
    """prompt_logprobs scores every prompt token after the first under the tokens before it (the model's own
    distribution, with its top alternatives), across prefill chunks and beside a plain request in the same steps;
    its prompt takes nothing from the prefix cache (so a second run is scored whole) and the sampled tokens are
    those of a request without it."""
    import torch

    engine = make(loaded, max_num_batched_tokens=16)
    tok = engine.tokenizer
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
    assert len(prompt) > 16
    plain = run_all(engine, [prompt], SamplingParams(max_tokens=3, temperature=0))[0]
    expected = torch.log_softmax(engine.prompt_logits(prompt), -1)
    for _ in range(2):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3))
        other = engine.add_request(tok.encode("Hello there"), SamplingParams(max_tokens=3, temperature=0))
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        out = done[rid]
        assert out.token_ids == plain and done[other].prompt_logprobs is None and out.cached_tokens == 0
        scored = out.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        for p, lp in enumerate(scored[1:], start=1):
            assert lp.token_id == prompt[p] and abs(lp.logprob - float(expected[p - 1, prompt[p]])) < 1e-4
            assert list(lp.top)[:3] == expected[p - 1].topk(3).indices.tolist() and prompt[p] in lp.top
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_n_samples_and_abort(loaded):
    engine = make(loaded)
    prompt = engine.tokenizer.encode("Write a word:")
    long_prompt = engine.tokenizer.encode("Here is a list of short English words, one per line: " * 4)
    rid = engine.add_request(long_prompt, SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=3))
    samples = list(engine.sequences[rid])
    while engine.has_unfinished():
        engine.step()
    assert [s.num_cached_prompt for s in samples] == [0] + [(len(long_prompt) - 1) // 16 * 16] * 2
    assert len({tuple(s.output_ids) for s in samples}) > 1  # each sample draws its own tokens
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    rid = engine.add_request(prompt, SamplingParams(max_tokens=50, n=3, temperature=1.0, seed=5))
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    engine.abort(rid)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_unfinished()


FAULTS_AFTER_AN_ENGINE = """
import json, resource, sys, torch
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
Engine(EngineConfig(model=sys.argv[1], quantization="none", kv_cache_memory=2**24))

def faults_making(n, size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(size) for _ in range(n)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps([faults_making(1, 3 * 2**24) for _ in range(4)]))  # a block of 192 MB, four times
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_cpu_engine_reuses_what_a_step_frees():
    """Once a CPU engine runs, a step's large intermediates, freed and made again, take no fresh pages: glibc's
    default maps every block over 32 MB afresh (49k page faults for this one, every time). In a process of its
    own, so that no earlier test's settings or heap serve it. The first block's free may still hand the heap's top
    back, where the engine's start left more than 64 MB free there besides it (past the 256 MB trim threshold: 1 in
    5-16 processes here, [48921, 49152, 0, 0]); from the next on, each is the last one's memory."""
    out = subprocess.run([sys.executable, "-c", FAULTS_AFTER_AN_ENGINE, str(model_path("smollm2-135m"))],
                         capture_output=True, text=True, check=True).stdout
    faults = json.loads(out.strip().splitlines()[-1])
    assert max(faults[2:]) < 500, faults


def test_invalid_parameters_name_the_field():
    for kwargs, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
                          ({"max_tokens": 0}, "max_tokens"), ({"min_p": 2}, "min_p"), ({"top_k": -5}, "top_k"),
                          ({"logprobs": 50}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_cuda_path_attention_and_padded_graph_steps_keep_greedy_output(loaded, reference, monkeypatch):
    """The CUDA path's pieces on the CPU: FlexAttention over the cache in place (eager here), then decode steps
    padded to the captured batch sizes through the graphs' fixed buffers (replayed eagerly off CUDA) — the same
    greedy tokens as the CPU kernel."""
    monkeypatch.setenv("MIAOTUI_ATTENTION", "flex")
    engine = make(loaded, kv_cache_memory=24 * 2**20)  # eager FlexAttention scores every cached slot: keep it small
    assert engine.runner.backend.name == "flex"
    prompts, expected = reference
    assert run_all(engine, prompts, GREEDY) == expected
    assert engine.runner.capture_graphs(8, engine.max_model_len) == 0.0  # nothing to capture off CUDA
    assert engine.runner.graphs.sizes == [1, 2, 4, 8]
    assert run_all(engine, prompts, GREEDY) == expected  # 5 rows padded to 8, later fewer
    assert engine.runner.graphs.replays >= GREEDY.max_tokens - 1
