"""Fault isolation: an exception while booking one request's token fails that request alone (its blocks come
back, the others finish); an exception in the forward pass fails that step's requests and the engine goes on."""

from __future__ import annotations

import pytest

from miaotui.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def drain(engine) -> dict[str, list]:
    finals: dict[str, list] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                finals.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    return finals


@pytest.fixture
def engine(smollm2_engine):
    yield smollm2_engine
    smollm2_engine.scheduler.on_token = None
    assert smollm2_engine.kv.usage == 0  # whatever failed, every block came back


def test_a_failing_request_fails_alone(engine):
    ids = engine.tokenizer.encode("The weather today is")

    def explode(seq, token):
        if seq.request_id == "bad" and len(seq.output_ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "forged")

    engine.scheduler.on_token = explode
    for rid in ("good-1", "bad", "good-2"):
        engine.add_request(ids, GREEDY, rid)
    finals = drain(engine)
    assert [o.finish_reason for o in finals["good-1"] + finals["good-2"]] == ["length", "length"]
    assert all(len(o.token_ids) == 6 for o in finals["good-1"] + finals["good-2"])
    (bad,) = finals["bad"]
    assert bad.finish_reason == "error" and "UnicodeDecodeError" in bad.error


def test_one_failing_sample_fails_its_siblings(engine):
    ids = engine.tokenizer.encode("Count with me: one, two,")
    engine.scheduler.on_token = lambda seq, token: (_ for _ in ()).throw(ValueError("x")) if (
        seq.index == 1 and len(seq.output_ids) == 1) else None
    engine.add_request(ids, SamplingParams(max_tokens=6, temperature=0.8, n=2, seed=1), "pair")
    engine.add_request(ids, GREEDY, "other")
    finals = drain(engine)
    assert sorted(o.finish_reason for o in finals["pair"]) == ["error", "error"]
    assert finals["other"][0].finish_reason == "length"


def test_a_failing_forward_pass_fails_its_step_and_the_engine_goes_on(engine, monkeypatch):
    ids = engine.tokenizer.encode("Paris is the capital of")
    engine.add_request(ids, GREEDY, "victim")
    real = engine.runner.run
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real(batch)

    monkeypatch.setattr(engine.runner, "run", flaky)
    finals = drain(engine)
    assert finals["victim"][0].finish_reason == "error" and "simulated" in finals["victim"][0].error
    engine.add_request(ids, GREEDY, "after")
    assert drain(engine)["after"][0].finish_reason == "length"


@pytest.mark.parametrize("penalty", [{"presence_penalty": 1.0}, {"frequency_penalty": 0.5},
                                     {"repetition_penalty": 1.3}])
def test_penalties_in_decode_steps(engine, penalty):
    """Found by the API fuzzer: a penalty on the second token edited inference-mode logits outside it (a 500)."""
    ids = engine.tokenizer.encode("0")
    engine.add_request(ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, **penalty), "pen")
    (out,) = drain(engine)["pen"]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
