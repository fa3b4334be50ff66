"""/v1/embeddings on a live `miaotui serve --embedding-model all-minilm-l6-v2`, through the official `openai` client
(which asks for base64 by default) and raw HTTP: the vectors equal the Python API's, and every misuse is a 4xx."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from miaotui.engine.embedder import Embedder
from tests.conftest import model_path
from tests.server.launch import serving

openai = pytest.importorskip("openai")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors.", "hi"]


@pytest.fixture(scope="module")
def base():
    folder = model_path("all-minilm-l6-v2").parent
    yield from serving(model_path("smollm2-135m"), "--embedding-model", str(folder), "--dtype", "float32")


@pytest.fixture(scope="module")
def local():
    return Embedder(str(model_path("all-minilm-l6-v2").parent), dtype="float32")


def test_openai_client_embeddings(base, local):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    name = client.models.list().data[1].id
    want = [o.embedding for o in local.embed(TEXTS)]
    for fmt in ({}, {"encoding_format": "float"}):  # by default the client asks for base64 and decodes it
        r = client.embeddings.create(model=name, input=TEXTS, **fmt)
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == name
        for d, w in zip(r.data, want):
            assert d.embedding == pytest.approx(w, abs=1e-6)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(o.prompt_tokens for o in local.embed(TEXTS))
    raw = client.embeddings.create(model=name, input=TEXTS, encoding_format="base64")  # asked for: left encoded
    decoded = np.frombuffer(base64.b64decode(raw.data[2].embedding), dtype="<f4")
    assert decoded.tolist() == pytest.approx(want[2], abs=1e-6)
    one = client.embeddings.create(model=name, input=TEXTS[0])
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(want[0], abs=1e-6)
    ids = local.tokenize(TEXTS[:1])
    by_ids = client.embeddings.create(model=name, input=ids)
    assert by_ids.data[0].embedding == pytest.approx(want[0], abs=1e-6)


def test_embedding_misuse_is_a_4xx_and_the_server_goes_on(base):
    def post(**body):
        return httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)

    cases = [({"input": "x", "dimensions": 64}, 400, "dimensions"),
             ({"input": "word " * 400}, 400, "input"),
             ({"input": []}, 400, None),
             ({"input": "x", "model": "m"}, 404, "model"),  # the generation model
             ({"input": "x", "frobnicate": 1}, 400, None),
             ({"input": "x", "encoding_format": "int8"}, 400, None),
             ({"input": [[101, 10**7, 102]]}, 400, "input")]
    for body, status, param in cases:
        r = post(**body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
        if param:
            assert r.json()["error"]["param"] == param, r.text
    r = post(input="word " * 400, truncate_prompt_tokens=-1)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
    assert post(input="still serving").status_code == 200
    name = httpx.get(f"{base}/v1/models").json()["data"][1]["id"]
    chat = httpx.post(f"{base}/v1/chat/completions",
                      json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404 and "is the embedding model here" in chat.json()["error"]["message"], chat.text
    assert httpx.post(f"{base}/embeddings", json={"input": "no /v1"}).status_code == 200
