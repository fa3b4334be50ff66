"""Embedding models against sentence-transformers on the same weights: all-MiniLM-L6-v2 (a BERT folder, as
sentence-transformers loads it) and nomic-embed-text-v1.5 (GGUF; its reference is transformers' NomicBertModel,
given the file's tensors by the `gguf` package, inside sentence-transformers' mean pooling and normalization)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from miaotui.engine.embedder import Embedder
from miaotui.errors import MiaotuiError
from tests.conftest import model_path

st = pytest.importorskip("sentence_transformers")

TEXTS = [
    "search_query: What is the capital of France?",
    "search_document: Paris is the capital and most populous city of France, on the Seine.",
    "search_document: The mitochondrion is the powerhouse of the cell.",
    "Héllo wörld — 日本語のテキスト, ünïcödé and    odd   spacing!",
    "x",
    " ".join(["A long passage about printing presses, movable type and the spread of books in Europe."] * 12),
]


def cosines(ours: list, ref: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(torch.tensor([o.embedding for o in ours]), ref.float().cpu())


@pytest.fixture(scope="module")
def minilm():
    folder = model_path("all-minilm-l6-v2").parent
    return folder, Embedder(str(folder), dtype="float32")


def test_minilm_matches_sentence_transformers(minilm):
    folder, ours = minilm
    ref = st.SentenceTransformer(str(folder), device="cpu")
    assert ref.max_seq_length == ours.max_tokens == 256
    cos = cosines(ours.embed(TEXTS), ref.encode(TEXTS, convert_to_tensor=True))
    assert cos.min() >= 0.999, cos
    one_by_one = torch.tensor([ours.embed([t])[0].embedding for t in TEXTS])
    packed = torch.tensor([o.embedding for o in ours.embed(TEXTS)])
    assert torch.allclose(one_by_one, packed, atol=1e-5)  # packing several texts changes nothing
    ids = ours.tokenize(TEXTS[:2])
    assert ours.embed(ids)[1].embedding == pytest.approx(packed[1].tolist(), abs=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "last"])
def test_a_pooling_override_matches_sentence_transformers_pooling_that_way(minilm, pooling):
    folder, _ = minilm
    from sentence_transformers import models

    ours = Embedder(str(folder), dtype="float32", pooling=pooling)
    bert = models.Transformer(str(folder), max_seq_length=256)
    mode = {"cls": "cls", "last": "lasttoken"}[pooling]
    ref = st.SentenceTransformer(modules=[bert, models.Pooling(bert.get_embedding_dimension(), mode),
                                          models.Normalize()], device="cpu")
    cos = cosines(ours.embed(TEXTS), ref.encode(TEXTS, convert_to_tensor=True))
    assert cos.min() >= 0.999, cos
    with pytest.raises(MiaotuiError, match="pooling 'max'"):
        Embedder(str(folder), pooling="max")


def test_limits_are_refused_or_applied_never_ignored(minilm):
    _, ours = minilm
    long = "word " * 400
    with pytest.raises(MiaotuiError, match="256"):
        ours.embed([long])
    cut = ours.embed([long], truncate=-1)[0]
    assert cut.prompt_tokens == 256
    assert ours.embed([long], truncate=10)[0].prompt_tokens == 10
    with pytest.raises(MiaotuiError, match="dimensions"):
        ours.embed(["hi"], dimensions=128)
    with pytest.raises(MiaotuiError, match="vocabulary"):
        ours.embed([[101, 10**6, 102]])
    with pytest.raises(MiaotuiError, match="empty"):
        ours.embed([[]])


def _nomic_reference(path, tmp_path):
    """sentence-transformers over transformers' NomicBertModel holding the GGUF file's tensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import NomicBertConfig, NomicBertModel

    t = {x.name: torch.from_numpy(dequantize(x.data, x.tensor_type).copy()).float() for x in GGUFReader(path).tensors}
    sd = {"embeddings.word_embeddings.weight": t["token_embd.weight"],
          "embeddings.token_type_embeddings.weight": t["token_types.weight"],
          "embeddings.LayerNorm.weight": t["token_embd_norm.weight"], "embeddings.LayerNorm.bias": t["token_embd_norm.bias"]}
    for i in range(12):
        b, layer = f"blk.{i}.", f"layers.{i}."
        q, k, v = t[b + "attn_qkv.weight"].split(768)
        sd |= {layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
               layer + "self_attn.v_proj.weight": v, layer + "self_attn.o_proj.weight": t[b + "attn_output.weight"],
               layer + "mlp.gate_proj.weight": t[b + "ffn_gate.weight"], layer + "mlp.up_proj.weight": t[b + "ffn_up.weight"],
               layer + "mlp.down_proj.weight": t[b + "ffn_down.weight"]}
        for ours, theirs in (("attn_output_norm", "post_attention_layernorm"), ("layer_output_norm", "post_mlp_layernorm")):
            sd |= {f"{layer}{theirs}.weight": t[f"{b}{ours}.weight"], f"{layer}{theirs}.bias": t[f"{b}{ours}.bias"]}
    model = NomicBertModel(NomicBertConfig(vocab_size=len(t["token_embd.weight"])), add_pooling_layer=False)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(tmp_path)
    # the same uncased BERT vocabulary as all-MiniLM-L6-v2's tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(model_path("all-minilm-l6-v2").parent / name, tmp_path)
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    return st.SentenceTransformer(modules=[Transformer(str(tmp_path), max_seq_length=2048), Pooling(768, "mean"),
                                           Normalize()], device="cpu")


@pytest.mark.slow
def test_nomic_gguf_matches_transformers(tmp_path):
    path = model_path("nomic-embed-text-v1.5")
    ours = Embedder(str(path), dtype="float32")
    ref = _nomic_reference(path, tmp_path)
    assert ours.tokenize(TEXTS) == [ref.tokenizer(t)["input_ids"] for t in TEXTS]  # WordPiece rebuilt from GGUF
    got = ours.embed(TEXTS)
    want = ref.encode(TEXTS, convert_to_tensor=True)
    cos = cosines(got, want)
    assert cos.min() >= 0.999, cos
    v = torch.tensor([o.embedding for o in got])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # the query finds its document
    # Matryoshka: nomic's recipe (layer norm, cut, unit length) on the reference's unnormalized mean
    ref.pop(-1)  # without Normalize
    raw = ref.encode(TEXTS[:3], convert_to_tensor=True)
    short = F.normalize(F.layer_norm(raw, (768,))[:, :256], dim=-1)
    cos = cosines(ours.embed(TEXTS[:3], dimensions=256), short)
    assert cos.min() >= 0.999 and len(ours.embed(["hi"], dimensions=64)[0].embedding) == 64
    with pytest.raises(MiaotuiError, match="from 64 to 768"):
        ours.embed(["hi"], dimensions=32)
