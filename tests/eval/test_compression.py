"""The compression table command: each row measured in its own process, pruned rows through `miaotui compress`,
and the weights each setting holds."""

from __future__ import annotations

import math

from miaotui.eval import compression


def test_int4_weights_take_under_045_of_bf16(smollm2_path):
    from miaotui import LLM

    size = {q: compression.weight_bytes(LLM(str(smollm2_path), dtype="bfloat16", quantization=q,
                                            kv_cache_memory=2**24).engine.loaded.model) for q in ("none", "int4")}
    assert size["int4"] <= 0.45 * size["none"]
    assert size["none"] > 250 * 2**20  # 135 M bf16 weights, not a count that missed the packed ones


def test_table_rows(smollm2_path, tmp_path):
    before = sorted(p.name for p in smollm2_path.parent.iterdir())
    rows = compression.run([str(smollm2_path)], ["float", "drop 2 layers"], chunks=1, decode_tokens=4,
                           prefill_tokens=32, repeats=1, tasks=["wiki-describe"], limit=3)
    assert [r["setting"] for r in rows] == ["float", "drop 2 layers"]
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert r["decode"] > 0 and r["prefill"] > 0 and r["weights_mb"] > 0
        assert r["decode_j"] > 0 and r["prefill_j"] > 0 and r["energy_method"]
        assert 0 <= r["tasks"]["wiki-describe"] <= 100 and r["task_items"] == {"wiki-describe": 3}
    assert rows[0]["tasks"]["wiki-describe"] > 0  # the float model's answers overlap the references
    assert rows[1]["weights_mb"] < rows[0]["weights_mb"]  # two blocks fewer
    assert sorted(p.name for p in smollm2_path.parent.iterdir()) == before  # written to a temporary folder only
    table = compression.format_table(rows)
    assert "| float (float32) " in table or "| float (bfloat16) " in table
    assert "+0.00%" in table and "wiki-describe" in table and "| +0.0 " in table
    assert f"Joules per token: {rows[0]['energy_method']}." in table
    compression.plot(rows, str(tmp_path / "table.png"))
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embedding_reads_its_int8_table(smollm2_path):
    import torch

    from miaotui import LLM
    from miaotui.quant.int8 import Int8Weight

    llm = LLM(str(smollm2_path), dtype="bfloat16", quantization="int8", kv_cache_memory=2**24)
    model = llm.engine.loaded.model
    emb = model.get_input_embeddings()
    assert emb.format is model.head  # tied: one int8 table for both
    assert isinstance(emb.format, Int8Weight)
    ids = torch.tensor([1, 5, 900])
    assert torch.allclose(emb(ids).float(), emb.format.dequantize()[ids], rtol=1e-2, atol=1e-3)
