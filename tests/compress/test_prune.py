"""Pruning and `miaotui compress`: each method's sparsity pattern, and a compressed folder that miaotui loads back
and transformers computes the same logits from."""

from __future__ import annotations

import json

import pytest
import torch

from miaotui.cli import main
from miaotui.compress import prune
from miaotui.compress.export import pack_int4, pack_int8
from miaotui.loader import stored


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 128),
            "model.layers.0.input_layernorm.weight": torch.randn(128),
            "model.embed_tokens.weight": torch.randn(10, 128)}


def test_magnitude_zeros_the_smallest_of_every_row(state):
    w0 = state["model.layers.0.mlp.up_proj.weight"].clone()
    prune.magnitude(state, 0.3)
    w = state["model.layers.0.mlp.up_proj.weight"]
    k = int(0.3 * 128)
    assert ((w == 0).sum(dim=1) == k).all()
    # Every weight kept is at least as large as every weight zeroed in its row.
    kept_min = torch.where(w != 0, w0.abs(), torch.inf).amin(dim=1)
    dropped_max = torch.where(w == 0, w0.abs(), 0).amax(dim=1)
    assert (kept_min >= dropped_max).all()
    assert prune.sparsity(state) == pytest.approx(k / 128)
    assert (state["model.embed_tokens.weight"] != 0).all()  # only block projections are pruned
    with pytest.raises(ValueError, match="sparsity"):
        prune.magnitude(state, 1.5)


def test_two_four_keeps_the_two_largest_of_every_four(state):
    w0 = state["model.layers.0.mlp.up_proj.weight"].clone()
    prune.two_four(state)
    g = state["model.layers.0.mlp.up_proj.weight"].view(64, 32, 4)
    assert ((g != 0).sum(-1) == 2).all()
    top2 = w0.view(64, 32, 4).abs().topk(2, dim=-1).values.sum(-1)
    assert torch.allclose(g.abs().sum(-1), top2)


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_quantized_weights_unpack_within_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    parts = pack_int8(w) if bits == 8 else pack_int4(w, 32)
    back = stored.dequantize(stored.read_codes("x", lambda name: parts.get(name.removeprefix("x."))))
    if bits == 8:
        step = w.abs().amax(dim=1, keepdim=True) / 127 * 1.01
    else:
        g = w.view(32, 4, 32)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, dim=1) * 1.01
    assert ((back - w).abs() <= step / 2 + w.abs().max() * 2**-8).all()


def _transformers_matches(folder, llm):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Paged attention stores keys and values in fixed-size blocks, so memory is never wasted."
    ids = llm.tokenizer.encode(text)
    assert tok(text)["input_ids"] == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    ours = llm.engine.prompt_logits(ids)
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_compress_drops_layers_and_loads_back(smollm2_path, tmp_path, capsys):
    from miaotui import LLM, SamplingParams

    out = tmp_path / "smol-drop2"
    assert main(["compress", str(smollm2_path), "-o", str(out), "--prune", "layers", "--drop-layers", "2",
                 "--dtype", "float32", "--calibration-tokens", "512"]) == 0
    printed = capsys.readouterr().out
    assert "dropping layers" in printed
    scores = [float(s.split(":")[1]) for s in printed.split("angular distance): ")[1].split("\n")[0].split()]
    dropped = json.loads(printed.split("dropping layers ")[1].split("\n")[0])
    assert sorted(scores)[:2] == sorted(scores[i] for i in dropped)  # the two least-turning blocks went
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 28
    llm = LLM(str(out), dtype="float32", kv_cache_memory=32 * 2**20, max_model_len=512)
    assert llm.engine.model_config.num_layers == 28
    text = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0),
                        use_tqdm=False)[0].text
    assert text.strip()
    _transformers_matches(out, llm)


def test_compress_gemma_keeps_each_layers_attention_type(gemma3_path, tmp_path):
    from miaotui import LLM

    out = tmp_path / "gemma-drop2"
    assert main(["compress", str(gemma3_path), "-o", str(out), "--prune", "layers", "--drop-layers", "2",
                 "--dtype", "float32", "--calibration-tokens", "256"]) == 0
    types = json.loads((out / "config.json").read_text())["layer_types"]
    assert len(types) == 16 and types.count("full_attention") in (2, 3)  # 18 layers had 3 global ones
    llm = LLM(str(out), dtype="float32", kv_cache_memory=32 * 2**20, max_model_len=512)
    assert [llm.engine.model_config.is_sliding(i) for i in range(16)] == [t == "sliding_attention" for t in types]
    _transformers_matches(out, llm)


def test_compress_2_4_int4_is_sparse_and_stays_packed(smollm2_path, tmp_path):
    from miaotui import LLM
    from miaotui.quant.int4 import Int4Weight

    out = tmp_path / "smol-24-int4"
    assert main(["compress", str(smollm2_path), "-o", str(out), "--prune", "2:4", "--quantize", "int4"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["method"] == "int4"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
        assert packed.dtype == torch.uint8
    llm = LLM(str(out), dtype="float32", kv_cache_memory=32 * 2**20, max_model_len=512)
    assert llm.engine.quantization == "int4"
    assert isinstance(llm.engine.loaded.model.model.layers[0].mlp.gate_up_proj.format, Int4Weight)


def test_stored_int4_loads_back_exactly_at_its_group_size(smollm2_path, tmp_path):
    """A folder stored with --group-size 64 loads back at group 64 (the config's quantization_config is read), its
    codes taken as they are: every weight equals the stored one up to the fp16 rounding of its group's offset."""
    from safetensors import safe_open

    from miaotui import LLM

    out = tmp_path / "smol-int4-g64"
    assert main(["compress", str(smollm2_path), "-o", str(out), "--quantize", "int4", "--group-size", "64"]) == 0
    llm = LLM(str(out), dtype="float32", kv_cache_memory=32 * 2**20, max_model_len=512)
    assert llm.engine.quantization == "int4" and llm.engine.model_config.quantization_group == 64
    down = llm.engine.loaded.model.model.layers[2].mlp.down_proj.format
    assert down.group == 64
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        want = stored.dequantize(stored.read_codes("model.layers.2.mlp.down_proj", f.get_tensor))
    got = down.dequantize()
    scale = want.abs().amax(dim=1, keepdim=True)
    assert ((got - want).abs() <= scale * 2**-8).all()  # (torch's int4 layout, where it serves, rounds to bf16)


def test_compress_refuses_bad_arguments(smollm2_path, tmp_path, capsys):
    assert main(["compress", str(smollm2_path), "-o", str(tmp_path / "x"), "--prune", "magnitude"]) == 2
    assert "--sparsity" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["compress", str(smollm2_path), "-o", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
