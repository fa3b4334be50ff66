"""Fill-in-the-middle through OpenAI's completions `suffix` on a live `miaotui serve` of Qwen2.5-Coder-0.5B-Instruct
(whose vocabulary has the FIM tokens): the prompt is built from prefix, suffix and those tokens, and the code after
the gap steers what the model writes into it; a token-id prompt with a suffix gets a 400 naming `suffix`."""

from __future__ import annotations

import httpx
import pytest

from miaotui.loader.gguf_file import GGUFFile
from miaotui.tokenizer import Tokenizer
from tests.conftest import model_path
from tests.server.launch import serving

openai = pytest.importorskip("openai")

PREFIX = "import math\n\ndef circle_area(r):\n"
SUFFIX = "\n\nprint(circle_area(1.0))\n"


@pytest.fixture(scope="module")
def base():
    yield from serving(model_path("qwen2.5-coder-0.5b"), "--max-model-len", "1024")


def test_the_suffix_fills_the_gap(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    kw = {"model": "m", "prompt": PREFIX, "max_tokens": 12, "temperature": 0}
    filled = client.completions.create(**kw, suffix=SUFFIX)
    plain = client.completions.create(**kw)
    assert filled.choices[0].text.startswith("    return math.pi"), filled.choices[0].text
    assert not plain.choices[0].text.startswith("    return")  # alone, the prefix gets a docstring first
    path = model_path("qwen2.5-coder-0.5b")
    tok = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    ids, ends = tok.encode_infill(PREFIX, SUFFIX)
    assert filled.usage.prompt_tokens == len(ids)
    assert [tok.token_text(i) for i in (ids[0], ids[-1])] == ["<|fim_prefix|>", "<|fim_middle|>"]
    assert {tok.token_text(i) for i in ends} == {"<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"}


def test_a_suffix_needs_a_text_prompt(base):
    r = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 3], "suffix": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix", r.text


def test_python_api_infill():
    from miaotui import LLM, SamplingParams

    llm = LLM(str(model_path("qwen2.5-coder-0.5b")), max_model_len=1024)
    out = llm.infill(PREFIX, SUFFIX, SamplingParams(temperature=0, max_tokens=12))
    assert out.text.startswith("    return math.pi"), out.text
