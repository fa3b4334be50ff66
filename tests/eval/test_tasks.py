"""`miaotui eval tasks`: each task's scoring on items with known answers, its items fixed by its seed, and a real
run through the chat template on the default model."""

from __future__ import annotations

import pytest

from miaotui.errors import MiaotuiError
from miaotui.eval import tasks


def test_token_f1_is_squads():
    # precision 2/2 (articles dropped), recall 2/3 -> F1 0.8
    assert tasks.token_f1(["The American poet"], ["American poet (1830–1886)"]) == pytest.approx(80.0)
    assert tasks.token_f1(["Port city in southern Iraq."], ["port city in southern Iraq"]) == pytest.approx(100.0)
    assert tasks.token_f1(["a bird"], ["Period of Roman history"]) == 0.0
    assert tasks.token_f1(["x", "port city"], ["y", "port city"]) == pytest.approx(50.0)


def test_chrf_scores_identical_text_100_and_unrelated_text_near_0():
    assert tasks.chrf(["这些图片真好看。"], ["这些图片真好看。"]) == pytest.approx(100.0)
    assert tasks.chrf(["The book is under the box."], ["The book is at the bottom of the box."]) > 40
    assert tasks.chrf(["zzzz qqqq"], ["The two nations interact a lot."]) < 5


def test_items_are_fixed_and_a_smaller_limit_is_a_prefix():
    for task in tasks.TASKS.values():
        five, three = task.items(5), task.items(3)
        assert len(five) == 5 and five[:3] == three, task.name
        assert all(item.reference and item.prompt for item in five)
    zh_en, en_zh = tasks.TASKS["translate-zh-en"].items(3), tasks.TASKS["translate-en-zh"].items(3)
    for a, b in zip(zh_en, en_zh):  # the same sentence pairs, each direction's source in the other's reference
        assert b.reference in a.prompt and a.reference in b.prompt


def test_the_answer_is_the_first_line_without_quotes():
    assert tasks.clean('\n  "Port city in southern Iraq"\nMore text') == "Port city in southern Iraq"
    assert tasks.clean("") == ""


def test_a_real_run_on_the_default_model(smollm2_path):
    from miaotui import LLM

    llm = LLM(str(smollm2_path), kv_cache_memory=64 * 2**20)
    results = tasks.run(llm, list(tasks.TASKS), limit=2, use_tqdm=False)
    assert [r.task for r in results] == list(tasks.TASKS)
    for r in results:
        assert r.items == 2 and 0 <= r.score <= 100 and r.generated_tokens > 0, r
    table = tasks.format_results(results)
    assert "| translate-zh-en | chrF" in table and "wiki-describe" in table
    with pytest.raises(MiaotuiError, match="unknown task 'mmlu'"):
        tasks.run(llm, ["mmlu"], limit=1)


def test_a_model_without_a_chat_template_gets_plain_prompts(gemma3_path):
    from miaotui import LLM

    llm = LLM(str(gemma3_path), kv_cache_memory=64 * 2**20)
    assert not llm.tokenizer.chat_template  # this file is the base model
    [result] = tasks.run(llm, ["wiki-describe"], limit=2, use_tqdm=False)
    assert result.items == 2 and result.generated_tokens > 0


def test_llama_cpp_scores_the_same_prompts(smollm2_path):
    """--compare: llama.cpp is given miaotui's prompt ids and stop tokens; on a task both engines answer alike."""
    pytest.importorskip("llama_cpp")
    from miaotui import LLM

    llm = LLM(str(smollm2_path), kv_cache_memory=64 * 2**20)
    ours = tasks.run(llm, ["wiki-describe"], limit=3, use_tqdm=False)
    peer = tasks.run_llama_cpp(str(smollm2_path), llm.tokenizer, ["wiki-describe"], limit=3)
    assert peer[0].items == 3 and peer[0].generated_tokens > 0 and peer[0].score > 10  # real answers
    assert abs(ours[0].score - peer[0].score) < 35  # three items: a different answer moves F1 by up to 33
    assert "| llama.cpp | miaotui - llama.cpp |" in tasks.format_results(ours, peer)


def test_humaneval_scores_canonical_solutions_and_refuses_wrong_ones():
    """The data set's own solutions pass (as a completion after the prompt, and as a whole function in a chat
    answer's code block); a wrong body fails."""
    import gzip
    import json

    from miaotui.loader.sources import data_file

    with gzip.open(data_file(*tasks.HUMANEVAL), "rt") as f:
        problems = [json.loads(line) for _, line in zip(range(3), f)]
    items = tasks.TASKS["humaneval"].items(3)
    refs = [it.reference for it in items]
    assert [json.loads(r)["entry_point"] for r in refs] == [p["entry_point"] for p in problems]
    completions = [tasks.code_answer(p["canonical_solution"]) for p in problems]
    assert tasks.pass_at_1(completions, refs) == 100.0
    chat = [tasks.code_answer(f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone.")
            for p in problems]
    assert tasks.pass_at_1(chat, refs) == 100.0
    assert tasks.pass_at_1(["    return None\n"] * 3, refs) == 0.0
