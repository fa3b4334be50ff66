"""A live `miaotui serve --speculative-config`: streamed and non-streamed completions agree token for token with a
server that does not speculate, several tokens can arrive in one chunk, and /metrics counts proposals."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import model_path
from tests.engine.test_speculative import PROMPTS
from tests.server.launch import serving

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def spec_base():
    yield from serving(model_path("smollm2-135m"), "--dtype", "float32", "--speculative-config",
                       json.dumps({"method": "ngram", "num_speculative_tokens": 4}))


@pytest.fixture(scope="module")
def plain_base():
    yield from serving(model_path("smollm2-135m"), "--dtype", "float32")


def test_speculative_server_answers_as_the_plain_one(spec_base, plain_base):
    spec = openai.OpenAI(base_url=f"{spec_base}/v1", api_key="unused")
    plain = openai.OpenAI(base_url=f"{plain_base}/v1", api_key="unused")
    kw = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0}
    want = plain.completions.create(**kw).choices[0].text
    assert spec.completions.create(**kw).choices[0].text == want
    chunks = [c.choices[0].text for c in spec.completions.create(**kw, stream=True) if c.choices]
    assert "".join(chunks) == want
    seeded = {**kw, "temperature": 0.9, "seed": 11}
    assert spec.completions.create(**seeded).choices[0].text == plain.completions.create(**seeded).choices[0].text
    metrics = httpx.get(f"{spec_base}/metrics").text
    drafted = float(re.search(r"^miaotui_spec_decode_num_draft_tokens_total (\S+)$", metrics, re.MULTILINE).group(1))
    accepted = float(re.search(r"^miaotui_spec_decode_num_accepted_tokens_total (\S+)$", metrics, re.MULTILINE).group(1))
    assert drafted > 0 and 0 < accepted <= drafted


def test_a_bad_speculative_config_stops_the_start_with_a_clear_error():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "miaotui.cli", "serve", "--model", str(model_path("smollm2-135m")),
                        "--speculative-config", '{"method": "medusa"}'], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode != 0 and "unknown speculative method 'medusa'" in r.stderr
