"""Structured output through the engine (llguidance masks in the sampler): every constrained output parses and
validates, at temperature 1 too, side by side with free requests that stay exactly as they were, through
preemption and n > 1; logit_bias; bad constraints refused with a clear error."""

from __future__ import annotations

import json
import re

import pytest

from miaotui import SamplingParams
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from miaotui.errors import GrammarError
from miaotui.sampling import StructuredOutput

jsonschema = pytest.importorskip("jsonschema")

# Every keyword family: nested objects, arrays with bounds, enums, required and optional, bounded numbers, patterns.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
SMALL = {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
         "required": ["id", "ok"], "additionalProperties": False}
PROMPT = "Here is a record of a person, as JSON:\n"


def run(engine: Engine, prompts: list[str], params: list[SamplingParams]) -> list:
    ids = [engine.add_request(engine.tokenizer.encode(p), sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[(out.request_id, out.index)] = out
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return [done[(rid, i)] for rid, sp in zip(ids, params) for i in range(sp.n)]


def constrained(spec: StructuredOutput, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 160)
    return SamplingParams(structured_output=spec, **kw)


def test_json_schema_outputs_validate_at_temperature_1(smollm2_engine):
    params = [constrained(StructuredOutput(json=PERSON), temperature=1.0, seed=s, max_tokens=250) for s in range(6)]
    for out in run(smollm2_engine, [PROMPT] * len(params), params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)


def test_regex_choice_and_grammar(smollm2_engine):
    grammar = 'start: "(" NUM " + " NUM ")"\nNUM: /[0-9]{1,3}/'
    gbnf = 'root ::= "[" num ("," num){2} "]"\nnum ::= [1-9] [0-9]?'  # llama.cpp's grammar format
    outs = run(smollm2_engine, ["Phone: ", "Is the sky blue? Answer:", "An addition: ", "Three numbers: "], [
        constrained(StructuredOutput(regex=r"\(\d{3}\) \d{3}-\d{4}"), temperature=0.8, seed=1),
        constrained(StructuredOutput(choice=["yes", "no", "maybe not"]), temperature=0),
        constrained(StructuredOutput(grammar=grammar), temperature=0.8, seed=2),
        constrained(StructuredOutput(grammar=gbnf), temperature=0.8, seed=3)])
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", outs[0].text), outs[0].text
    assert outs[1].text in ("yes", "no", "maybe not")
    assert re.fullmatch(r"\(\d{1,3} \+ \d{1,3}\)", outs[2].text), outs[2].text
    assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?){2}\]", outs[3].text), outs[3].text
    assert all(o.finish_reason == "stop" for o in outs)


def test_free_requests_beside_constrained_ones_are_unchanged(smollm2_engine):
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = run(smollm2_engine, ["The quick brown fox"], [free])[0].token_ids
    outs = run(smollm2_engine, [PROMPT, "The quick brown fox", PROMPT],
               [constrained(StructuredOutput(json=SMALL), temperature=0), free,
                constrained(StructuredOutput(json=PERSON), temperature=1.0, seed=3, n=2, max_tokens=250)])
    assert outs[1].token_ids == alone
    jsonschema.validate(json.loads(outs[0].text), SMALL)
    for o in outs[2:]:
        jsonschema.validate(json.loads(o.text), PERSON)


def test_json_whitespace_is_capped(smollm2_engine):
    """Runaway whitespace inside JSON (a newline after newline until max_tokens) cannot happen: the grammar caps
    each run of whitespace, and a strong push towards newlines (logit_bias) does not get past the cap."""
    newline = smollm2_engine.tokenizer.encode("\n", add_special_tokens=False)[0]
    out = run(smollm2_engine, [PROMPT], [constrained(StructuredOutput(json_object=True), temperature=0,
                                                     logit_bias={newline: 30.0}, max_tokens=120)])[0]
    assert not re.search(r"\n\s*\n", out.text), repr(out.text)


def test_constraints_hold_through_preemption(smollm2_path):
    engine = Engine(EngineConfig(model=str(smollm2_path), dtype="float32", quantization="none",
                                 kv_cache_memory=2 * 30 * 3 * 64 * 4 * 16 * 10, max_model_len=256))  # 10 blocks
    params = [constrained(StructuredOutput(json=PERSON), temperature=1.0, seed=s, max_tokens=120) for s in range(4)]
    outs = run(engine, [PROMPT] * 4, params)
    assert engine.scheduler.num_preemptions > 0
    for out in outs:
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), PERSON)


def test_logit_bias_forces_and_bans(smollm2_engine):
    tok = smollm2_engine.tokenizer
    free = run(smollm2_engine, ["The capital of France is"], [SamplingParams(max_tokens=1, temperature=0)])[0]
    first = free.token_ids[0]
    banned = run(smollm2_engine, ["The capital of France is"],
                 [SamplingParams(max_tokens=1, temperature=0, logit_bias={first: -100})])[0]
    assert banned.token_ids[0] != first
    x = tok.encode(" zebra", add_special_tokens=False)[0]
    forced = run(smollm2_engine, ["The capital of France is"],
                 [SamplingParams(max_tokens=3, temperature=1.0, seed=0, logit_bias={x: 100})])[0]
    assert forced.token_ids == [x] * 3


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput(regex="(unclosed"), "invalid regex"),
    (StructuredOutput(json={"type": "no-such-type"}), "invalid json"),
    (StructuredOutput(grammar="start: undefined_rule"), "invalid grammar"),
    (StructuredOutput(grammar='root ::= "a" ('), "invalid grammar"),
])
def test_bad_constraints_are_refused(smollm2_engine, spec, message):
    with pytest.raises(GrammarError, match=message):
        smollm2_engine.add_request([1, 2, 3], constrained(spec))
    assert not smollm2_engine.has_unfinished()


def test_a_constraint_names_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 500.0})


def test_compiling_has_a_time_limit_and_a_cache(smollm2_engine):
    from miaotui.engine.structured import Grammars

    grammars = Grammars(smollm2_engine.tokenizer, smollm2_engine.model_config.vocab_size, timeout_s=0.001)
    spec = StructuredOutput(json=PERSON)
    with pytest.raises(GrammarError, match="did not compile within"):  # the first compile builds the trie (~0.3 s)
        grammars.compile(spec)
    grammars.timeout_s = 30
    first = grammars.compile(spec)
    again = grammars.compile(spec)
    assert first is not again and len(grammars._cache) == 1  # a fresh matcher per request, one compiled grammar
