"""Speculative decoding: with every method, greedy and seeded outputs are token for token those of plain decoding
(three real models, stop strings, max_tokens, logprobs, an output constraint, preemption, n > 1); the check of a
proposal keeps the target distribution (a statistical test on the sampler); prefix-cache hashes cover accepted
tokens only; k adapts and a full batch does not speculate; bad configurations are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui import LLM, SamplingParams, StructuredOutput
from miaotui.config import SpeculativeConfig
from miaotui.engine import draft_model
from miaotui.engine.sampler import Sampler
from miaotui.engine.scheduler import ScheduledBatch
from miaotui.engine.sequence import Sequence
from miaotui.engine.speculative import (
    TRIALS,
    ContextIndex,
    NgramIndex,
    Proposer,
    Speculator,
    StepPrice,
    SuffixProposer,
    best_k,
)
from miaotui.errors import MiaotuiError
from miaotui.kernels import has_packed
from tests.conftest import model_path

PASSAGE = ("The Amazon River in South America is the largest river by discharge volume of water in the world, "
           "and the disputed longest river system in the world in comparison to the Nile. The headwaters of the "
           "Apurimac River on Nevado Mismi had been considered for nearly a century as the Amazon basin's most "
           "distant source.")
PROMPTS = [
    f"{PASSAGE}\n\nCopy the first sentence of the text above.\n{PASSAGE[:40]}",
    f"{PASSAGE}\n\nQuestion: Which river is the largest by discharge volume?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time",
]
SPECS = [{"method": "ngram", "num_speculative_tokens": 4},
         {"method": "suffix", "num_speculative_tokens": 3, "prompt_lookup_max": 3}]


def llm(alias: str, speculative=None, **kw) -> LLM:
    """fp32 unless asked otherwise, on every CPU class, so both sides of a comparison run the same kernels.
    Speculation is priced as on a machine where rows are cheap, so these tests exercise it whatever this CPU's row
    cost."""
    model = LLM(str(model_path(alias)), speculative=speculative, kv_cache_memory=kw.pop("kv", 64 * 2**20),
                dtype=kw.pop("dtype", "float32"), max_model_len=1024, **kw)
    if speculative is not None:
        model.engine.speculator.price = StepPrice.fixed(0.05)
    return model


def run(model: LLM, params, prompts=PROMPTS):
    return model.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def plain():
    return llm("smollm2-135m")


@pytest.mark.parametrize("spec", [*SPECS, {"method": "draft_model", "model": "smollm2-135m"}],
                         ids=["ngram", "suffix", "draft_model"])
def test_greedy_and_seeded_outputs_are_those_of_plain_decoding(plain, spec):
    model = llm("smollm2-135m", spec)
    greedy = [SamplingParams(temperature=0, max_tokens=48, logprobs=2) for _ in PROMPTS]
    greedy[1] = SamplingParams(temperature=0, max_tokens=48, stop=["\n"])
    greedy[2] = SamplingParams(temperature=0, max_tokens=48, logprobs=2, min_tokens=24, stop=[" Fibonacci"],
                               include_stop_str_in_output=True)
    seeded = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=40) for i in range(len(PROMPTS))]
    for params in (greedy, seeded):
        ours, theirs = run(model, params), run(plain, params)
        for a, b in zip(ours, theirs):
            assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=5e-3)
                assert x.top.keys() == y.top.keys()
    copy = run(model, SamplingParams(temperature=0, max_tokens=48), PROMPTS[:1])[0].metrics
    assert copy.verify_steps and copy.accepted_tokens >= copy.proposed_tokens / 2  # the copy task is taken in runs


def test_a_draft_head_over_a_shortlist_proposes_from_it_and_changes_no_output(plain, monkeypatch):
    """The draft's head over part of the vocabulary, in a non-trivial order (its row i scores token 8191 - i):
    proposals come from it, the copy task is still taken in runs, and the output is unchanged."""
    monkeypatch.setattr(draft_model, "SHORTLIST", 4096)
    monkeypatch.setattr(draft_model, "LOOKUP_MIN", 10**9)  # every proposal from the draft's head
    monkeypatch.setattr(draft_model, "TAIL", 10**9)  # which reads the whole passage it is to copy
    tok = plain.engine.tokenizer
    ids = draft_model.shortlist(tok, 49152).tolist()
    assert ids[:4096] == list(range(4096)) and tok.stop_ids <= set(ids)
    monkeypatch.setattr(draft_model, "shortlist", lambda tokenizer, vocab_size: torch.arange(8191, -1, -1))
    model = llm("smollm2-135m", {"method": "draft_model", "model": "smollm2-135m"})
    proposer = model.engine.speculator.proposer
    assert proposer.runner.model.head.shape == (8192, 576)
    proposed, propose = [], proposer.propose
    monkeypatch.setattr(proposer, "propose", lambda seqs, ks: [proposed.extend(d) or d for d in propose(seqs, ks)])
    params = SamplingParams(temperature=0, max_tokens=48)
    assert [o.token_ids for o in run(model, params)] == [o.token_ids for o in run(plain, params)]
    assert proposed and max(proposed) < 8192
    copy = run(model, params, PROMPTS[:1])[0].metrics
    assert copy.accepted_tokens >= copy.proposed_tokens / 2


def test_a_draft_model_takes_a_long_match_in_the_text_without_a_draft_pass(plain, monkeypatch):
    """On the copy task the text's own continuation is proposed where the last LOOKUP_MIN tokens occurred
    before: far fewer draft passes, the same output."""
    model = llm("smollm2-135m", {"method": "draft_model", "model": "smollm2-135m"})
    runner = model.engine.speculator.proposer.runner
    passes, forward = [], runner.forward
    monkeypatch.setattr(runner, "forward", lambda *a, **kw: passes.append(1) or forward(*a, **kw))
    params = SamplingParams(temperature=0, max_tokens=48)

    def copy():
        passes.clear()
        return run(model, params, PROMPTS[:1])[0].token_ids, len(passes)

    ids, with_lookup = copy()
    monkeypatch.setattr(draft_model, "LOOKUP_MIN", 10**9)
    assert copy()[0] == ids == run(plain, params, PROMPTS[:1])[0].token_ids
    assert with_lookup < len(passes) / 3


def test_a_request_too_near_its_end_to_pay_back_the_draft_does_not_start_it(monkeypatch):
    """The draft's first pass reads the whole prompt: a request with few tokens to go proposes by lookup only."""
    model = llm("smollm2-135m", {"method": "draft_model", "model": "smollm2-135m"})
    runner = model.engine.speculator.proposer.runner
    passes, forward = [], runner.forward
    monkeypatch.setattr(runner, "forward", lambda *a, **kw: passes.append(1) or forward(*a, **kw))
    prompt = run(model, SamplingParams(max_tokens=1), PROMPTS[1:2])[0].prompt_token_ids
    assert not passes
    short = len(prompt) // draft_model.PAYBACK - 2
    out = run(model, SamplingParams(temperature=0, max_tokens=short), PROMPTS[1:2])[0]
    assert len(out.token_ids) == short > 4 and not passes
    run(model, SamplingParams(temperature=0, max_tokens=48), PROMPTS[1:2])
    assert passes


def test_the_draft_reads_a_long_prompts_head_and_tail_only(plain, monkeypatch):
    """Of a prompt longer than HEAD + TAIL tokens the draft's first pass reads those and the token the model took;
    its proposals still hold, and the output is plain decoding's."""
    monkeypatch.setattr(draft_model, "LOOKUP_MIN", 10**9)  # every proposal from a draft pass
    model = llm("smollm2-135m", {"method": "draft_model", "model": "smollm2-135m"})
    runner = model.engine.speculator.proposer.runner
    counts, forward = [], runner.forward
    monkeypatch.setattr(runner, "forward", lambda seqs, n: counts.append(n) or forward(seqs, n))
    params = SamplingParams(temperature=0, max_tokens=32)
    out = run(model, params, PROMPTS[1:2])[0]
    assert out.token_ids == run(plain, params, PROMPTS[1:2])[0].token_ids
    assert len(out.prompt_token_ids) > draft_model.HEAD + draft_model.TAIL + 8
    assert counts[0] == [draft_model.HEAD + draft_model.TAIL + 1]
    assert out.metrics.accepted_tokens >= out.metrics.proposed_tokens / 2


@pytest.mark.parametrize("alias", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_greedy_outputs_match_on_the_other_models(alias):
    params = SamplingParams(temperature=0, max_tokens=32)
    theirs = run(llm(alias), params, PROMPTS[:3])
    ours = run(llm(alias, SPECS[0]), params, PROMPTS[:3])
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    assert sum(o.metrics.accepted_tokens for o in ours) > 0


def test_a_request_alone_is_exact_at_the_default_dtype():
    """At the default dtype (bf16 where the CPU has bf16 units) a check of 9 rows would take the products that
    prompts take (AMX tiles or a dense copy from 8 rows); a decode step that scores proposals takes a lone row's
    arithmetic instead, so a request decoding alone gets plain decoding's tokens whatever this CPU's class."""
    spec = llm("smollm2-135m", {"method": "ngram", "num_speculative_tokens": 8}, dtype="auto")
    plain = llm("smollm2-135m", dtype="auto")
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=1)
    for prompt in PROMPTS[:3]:
        ours, theirs = run(spec, params, [prompt])[0], run(plain, params, [prompt])[0]
        assert ours.token_ids == theirs.token_ids
        assert [x.logprob for x in ours.logprobs] == [x.logprob for x in theirs.logprobs]  # the same logits
        if prompt == PROMPTS[0]:  # the copy task: checks of 9 rows
            assert ours.metrics.accepted_tokens >= 24


def test_one_activation_term_keeps_speculation_exact_and_is_refused_where_nothing_uses_it(plain):
    """activation_bits=8 (one int8 term per activation, llama.cpp's rounding) changes the model's numbers — its
    logprobs differ from the default's — and speculative greedy output is still token for token its own plain
    decoding; where no weight runs on the integer kernels the setting is an error, not a no-op."""
    if not has_packed():
        pytest.skip("miaotui's integer kernels are not built here")
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=1)
    ours = run(llm("smollm2-135m", activation_bits=8), params)
    spec = run(llm("smollm2-135m", SPECS[0], activation_bits=8), params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in ours]
    base = run(plain, params)
    assert any(x.token_id == y.token_id and abs(x.logprob - y.logprob) > 1e-4
               for a, b in zip(ours, base) for x, y in zip(a.logprobs, b.logprobs))
    with pytest.raises(MiaotuiError, match="activation_bits 8"):
        llm("smollm2-135m", activation_bits=8, quantization="none")


def test_constrained_n2_and_preempted_requests_are_unchanged(plain):
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 30},
                                               "largest": {"type": "boolean"}},
              "required": ["river", "largest"], "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=60, structured_output=StructuredOutput(json=schema)),
              SamplingParams(temperature=0.7, seed=5, n=2, max_tokens=30),
              SamplingParams(temperature=0, max_tokens=60)]
    prompts = [PROMPTS[1] + " As JSON:", PROMPTS[0], PROMPTS[0]]
    small = llm("smollm2-135m", SPECS[0], kv=192 * 2 * 30 * 3 * 64 * 4)  # 192 tokens of SmolLM2's fp32 cache
    ours, theirs = run(small, params, prompts), run(plain, params, prompts)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    json.loads(ours[0].text)
    assert small.engine.scheduler.num_preemptions > 0


def test_the_check_keeps_the_target_distribution():
    """One proposal (token 1) over a 5-token vocabulary: the first token must follow p0, and after an accepted
    proposal the second must follow p1 (chi-square, 20,000 draws)."""
    p0 = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1])
    p1 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    logits = torch.stack([p0.log(), p1.log()])
    sampler = Sampler()
    seq = Sequence("s", [0], 1, SamplingParams(temperature=1.0), None, generator=torch.Generator().manual_seed(1),
                   draft=[1])
    batch = sampler.prepare([seq, seq], torch.device("cpu"), [[1]])
    first, second = np.zeros(5), np.zeros(5)
    for _ in range(20000):
        tokens = sampler.sample(logits.clone(), batch)[0][0]
        first[tokens[0]] += 1
        if len(tokens) == 2:
            assert tokens[0] == 1
            second[tokens[1]] += 1
    chi2 = lambda counts, p: float((((counts - counts.sum() * p.numpy()) ** 2) / (counts.sum() * p.numpy())).sum())
    assert chi2(first, p0) < 18.5 and chi2(second, p1) < 18.5  # 4 degrees of freedom, p = 0.001
    assert first[1] == second.sum()  # the second token exists exactly when the proposal was accepted


def test_prefix_cache_holds_accepted_tokens_only(plain):
    model = llm("smollm2-135m", SPECS[0])
    out = run(model, SamplingParams(temperature=0, max_tokens=64), PROMPTS[:1])[0]
    text = out.prompt_token_ids + out.token_ids
    blocks = {tuple(text[i:i + 16]) for i in range(0, len(text) - 15, 16)}
    cached = {t for t in model.engine.kv.block_tokens if t is not None}
    assert cached and cached <= blocks  # no block holds a proposal the model turned down
    again = run(model, SamplingParams(temperature=0, max_tokens=16), [text])[0]
    assert again.token_ids == run(plain, SamplingParams(temperature=0, max_tokens=16), [text])[0].token_ids
    assert model.engine.kv.prefix_hits > 0


def test_k_adapts_and_a_full_batch_does_not_speculate():
    config = SpeculativeConfig(num_speculative_tokens=6, disable_by_batch_size=2)

    class Fixed(Proposer):
        def propose(self, seqs, ks):
            return [[7] * k for k in ks]

    spec = Speculator(config, Fixed(), 1000, StepPrice.fixed(0.1))
    seq = Sequence("a", [1, 2, 3], 3, SamplingParams(max_tokens=100), None)
    seq.num_computed = 2
    spec.propose([seq])
    assert len(seq.draft) >= 2
    ks = []
    for _ in range(12):  # every proposal fails: k shrinks to 1, then the request waits
        seq.metrics.proposed_tokens += len(seq.draft)
        seq.draft = []
        spec.propose([seq])
        ks.append(len(seq.draft))
    assert ks[-1] <= 1 and 0 in ks
    seq.draft = []
    others = [Sequence(str(i), [1, 2], 2, SamplingParams(), None, num_computed=1) for i in range(3)]
    spec.propose(others)
    assert not any(s.draft for s in others)
    spec.propose(others[:1], waiting=2)  # a batch about to fill does not start either
    assert not others[0].draft
    near_end = Sequence("b", [1, 2, 3], 2, SamplingParams(max_tokens=3), None, num_computed=2)
    spec.propose([near_end])
    assert len(near_end.draft) == 1  # one output token so far, three allowed: one proposal and the last token


class CostlyProposer(Proposer):
    """Proposes k copies of one token, and its tries cost (as a draft model's); `free`: it has free proposals too."""

    retries = False

    def __init__(self, free: bool):
        self.free, self.released, self.stopped = free, [], []

    def propose(self, seqs, ks):
        return [[7] * k for k in ks]

    def release(self, seq):
        self.released.append(seq.request_id)

    def stop_dear(self, seq):
        self.stopped.append(seq.request_id)
        return self.free


def drive(spec: Speculator, steps: int, holds_from: int) -> list[int]:
    """One request's k, step by step, its proposals failing until step `holds_from` and holding from then on."""
    seq = Sequence("a", [1, 2, 3], 3, SamplingParams(max_tokens=500), None, num_computed=2)
    ks = []
    for i in range(steps):
        spec.propose([seq])
        ks.append(len(seq.draft))
        seq.metrics.proposed_tokens += len(seq.draft)
        seq.metrics.accepted_tokens += len(seq.draft) * (i >= holds_from)
        seq.draft = []
    return ks


def test_a_proposer_whose_retries_cost_stops_for_good_and_gives_back_what_it_held():
    draft = CostlyProposer(free=False)
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft, 1000, StepPrice.fixed(0.3))
    ks = drive(spec, 200, holds_from=200)  # every proposal fails
    stop = ks.index(0)
    assert sum(ks[:stop]) >= TRIALS and stop < 2 * TRIALS and not any(ks[stop:])  # then no tries after pauses
    assert draft.released == ["a"]


def test_a_proposer_whose_dear_proposals_stop_paying_goes_on_with_its_free_ones():
    draft = CostlyProposer(free=True)
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4), draft, 1000,
                      StepPrice(1.0, 0.1, per_proposal=1.0, learn=False))
    ks = drive(spec, 120, holds_from=30)  # every proposal fails until the 30th step, then every one holds
    stop = ks.index(0)
    assert sum(ks[:stop]) >= TRIALS and stop < 2 * TRIALS and draft.stopped == ["a"] and not draft.released
    assert ks[stop:30].count(0) > 10  # then tries after pauses
    assert ks[-10:] == [4] * 10  # and where they hold, k grows to the top at the free price (a dear one: 0)


def test_a_draft_model_whose_passes_stop_paying_keeps_proposing_lookups(plain):
    """Draft passes priced far above a step stop after their trials; the copy task's lookups still run, and the
    output is plain decoding's."""
    model = llm("smollm2-135m", {"method": "draft_model", "model": "smollm2-135m"})
    model.engine.speculator.price = StepPrice(1.0, 0.05, per_proposal=5.0, learn=False)
    params = SamplingParams(temperature=0, max_tokens=48)
    out = run(model, params, PROMPTS[:1])[0]
    assert out.token_ids == run(plain, params, PROMPTS[:1])[0].token_ids
    assert out.metrics.accepted_tokens > 2 * TRIALS
    assert not model.engine.speculator.proposer.shadows  # the draft's cache given back


def test_k_weighs_acceptance_against_the_cost_of_a_row():
    assert best_k(0.9, 0.05, 8) >= 6  # rows ride along with the weight reads: guess far
    assert best_k(0.86, 0.55, 4) in (1, 2)  # compute-bound rows (AVX2): a short guess
    assert best_k(0.3, 0.55, 4) == 0  # nothing pays: plain decoding
    assert best_k(0.3, 0.02, 4) >= 1
    never = Speculator(SpeculativeConfig(num_speculative_tokens=4), None, 1000, StepPrice.fixed(1.2))
    seq = Sequence("a", [1, 2, 3], 3, SamplingParams(max_tokens=100), None, num_computed=2)
    never.propose([seq])
    assert not never.pays() and seq.draft == []
    # dear proposals, cheap rows: speculation stays on (lookups pay) and each request's k weighs the whole price
    dear = Speculator(SpeculativeConfig(num_speculative_tokens=4), None, 1000,
                      StepPrice(1.0, 0.1, per_proposal=2.0, learn=False))
    assert dear.pays() and dear.price() == pytest.approx(2.1)


def test_where_rows_come_in_passes_k_stops_before_the_next_pass():
    """VNNI's 4-bit products take 4 rows a pass: a fifth costs a second pass. Priced as a line, a well-accepted
    request would guess 8 ahead; priced by the steps measured at each number of rows, it guesses 3 (4 rows)."""
    seconds = [1.0, 1.05, 1.1, 1.15, 2.0, 2.05, 2.1, 2.15, 2.2]  # 0 .. 8 extra rows
    price = StepPrice.measured(seconds)
    assert price() == pytest.approx(0.15)  # the line's average row, as before
    assert best_k(0.9, price(), 8) >= 6
    assert best_k(0.9, price(), 8, price.shape()) == 3
    assert best_k(0.99, price(), 8, price.shape()) == 8  # near-certain proposals still go past the step
    assert price.shape(seqs=4) is None  # a batch's rows fall into passes as they come: the line
    noisy = StepPrice.measured([1.0, 1.2, 1.1, 1.3])  # more rows never cost less: 1.1 read as 1.2
    assert noisy.shape() == pytest.approx([1.0, 2.0, 1.0, 1.0])


def test_the_price_of_a_proposal_is_learned_from_the_steps():
    """Priced wrong at start, the price follows the steps' own line; a machine that slows down as a whole keeps its
    price; proposals that cost nothing (lookups) lower it; in a batch a proposal weighs more."""
    price = StepPrice(0.02, 0.02, rows=4)  # start-up said a row costs a whole step
    assert price() == pytest.approx(1.0)
    for i in range(100):
        price.step(1 + i % 5, 0.02 + 0.002 * (i % 5))  # it costs a tenth
    assert price() == pytest.approx(0.1, abs=0.06)
    slow = StepPrice(0.02, 0.004, rows=4)
    for _ in range(100):
        slow.step(5, 2 * (0.02 + 4 * 0.004))  # always five rows, each step twice as slow as at start
    assert slow() == pytest.approx(0.2, rel=0.1)
    draft = StepPrice(0.02, 0.004, per_proposal=0.006, rows=4)  # a draft pass costs 0.3 of a step
    assert draft() == pytest.approx(0.5)
    for _ in range(100):
        draft.proposed(4, 0.0)
    assert draft() == pytest.approx(0.2, rel=0.2)
    assert draft(4) > 2 * draft()
    frozen = StepPrice.fixed(0.3)
    frozen.step(5, 100.0)
    assert frozen() == pytest.approx(0.3)


def test_the_engine_prices_from_its_decode_steps_only():
    model = LLM(str(model_path("smollm2-135m")), speculative=SPECS[0], kv_cache_memory=64 * 2**20,
                dtype="float32", max_model_len=1024)
    spec = model.engine.speculator
    seen, step = [], spec.price.step
    spec.price.step = lambda rows, seconds: seen.append(rows) or step(rows, seconds)
    out = run(model, SamplingParams(temperature=0, max_tokens=24), PROMPTS[:1])[0]
    assert 0 < len(seen) < len(out.token_ids)  # decode steps, fewer than tokens where proposals held
    steps = len(seen)
    spec.observe(ScheduledBatch([Sequence("a", [1, 2, 3, 4], 4, SamplingParams(), None)], [4]), 1.0)
    assert len(seen) == steps  # a prompt chunk is no point of the line


def scanned_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Prompt lookup by a scan of every earlier window: the k tokens after the latest earlier occurrence of the
    text's last n tokens, longest n first."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        starts = [h for h in range(len(tokens) - n) if tokens[h : h + n] == tokens[len(tokens) - n :]]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=60), st.integers(1, 3), st.integers(0, 3), st.integers(1, 5))
def test_the_ngram_index_finds_what_a_scan_finds(text, min_n, extra, k):
    """Kept up to date token by token (as a request's text grows between steps) or built at once, the index
    proposes what scanning the whole text proposes, at every length of it; asked for longer matches only (a draft
    model's lookups while it drafts), what a scan for those proposes."""
    index = NgramIndex(min_n, min_n + extra)
    for size in range(len(text) + 1):
        expected = scanned_lookup(text[:size], min_n, min_n + extra, k)
        assert index.lookup(text[:size], k) == expected
        assert NgramIndex(min_n, min_n + extra).lookup(text[:size], k) == expected
        if extra:
            assert index.lookup(text[:size], k, min_n + 1) == scanned_lookup(text[:size], min_n + 1, min_n + extra, k)


def test_lookup_and_suffix_index():
    assert NgramIndex(1, 3).lookup([5, 6, 7, 8, 1, 5, 6], 3) == [7, 8, 1]
    assert NgramIndex(1, 2).lookup([1, 2, 3], 2) == []
    index = ContextIndex(1, 2)
    index.add([1, 2, 3, 1, 2, 4, 1, 2, 4], 0)
    assert index.best([9, 1, 2]) == (2, 4)
    index.add([1, 2, 3, 1, 2, 4, 1, 2, 4], 0, sign=-1)
    assert index.next == {}


def test_suffix_guesses_follow_the_longer_context_own_or_shared():
    """A request's own text continues its last two tokens one way, an earlier output its last four another: the
    earlier output's longer context wins; on a tie, the request's own."""
    proposer = SuffixProposer(SpeculativeConfig(method="suffix", prompt_lookup_max=4))
    done = Sequence("a", [9], 1, SamplingParams(), None)
    done.token_ids += [5, 6, 7, 8, 1, 2, 3]
    done.finish_reason = "stop"
    proposer.release(done)  # learned: 5 6 7 8 -> 1 2 3
    seq = Sequence("b", [7, 8, 4, 4, 5, 6, 7, 8], 8, SamplingParams(), None)  # own: 7 8 -> 4
    assert proposer.propose([seq], [3]) == [[1, 2, 3]]
    tie = Sequence("c", [5, 6, 7, 8, 4, 0, 5, 6, 7, 8], 10, SamplingParams(), None)  # own: 5 6 7 8 -> 4
    assert proposer.propose([tie], [1]) == [[4]]


def test_the_shortest_lookup_defaults_to_two_tokens_or_the_longest():
    assert SpeculativeConfig().prompt_lookup_min == 2
    assert SpeculativeConfig.parse({"method": "ngram", "prompt_lookup_max": 1}).prompt_lookup_min == 1
    assert SpeculativeConfig.parse({"method": "ngram", "prompt_lookup_min": 1}).prompt_lookup_min == 1


@pytest.mark.parametrize("value, match", [
    ({"method": "eagle"}, "unknown speculative method"),
    ({"method": "ngram", "k": 3}, "unknown speculative config key"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "draft_model"}, "draft model"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
])
def test_bad_configs_are_refused(value, match):
    with pytest.raises(MiaotuiError, match=match):
        SpeculativeConfig.parse(value)


def test_a_draft_model_of_another_vocabulary_is_refused():
    with pytest.raises(MiaotuiError, match="another vocabulary"):
        llm("smollm2-135m", {"method": "draft_model", "model": str(model_path("gemma3-270m"))})
