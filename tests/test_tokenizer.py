"""Tokenizers rebuilt from GGUF vocabularies give transformers' ids, chat templates render identically, and
incremental detokenization streams Chinese and emoji without a broken character."""

from __future__ import annotations

import pytest

from miaotui.loader.gguf_file import GGUFFile
from miaotui.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.conftest import REAL_MODELS, model_path

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, 你好 🙂",
    "I have 2024 cats and 3.14159 dogs!!",
    "  leading spaces\n\n\ttabs   and    runs  ",
    "def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café — “quotes” ünïcödé 日本語のテキスト",
    "\u00a0\u2003odd spaces  ",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAA 1234567890 don't I'm we'll",
    "🤖👩‍👩‍👧 emoji sequences ﷽",
    "",
]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi 你好"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module", params=REAL_MODELS)
def pair(request):
    path = model_path(request.param)
    ours = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return request.param, ours, ref


def test_ids_match_transformers(pair):
    name, ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, f"{name}: {text!r}"
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(pair):
    name, ours, ref = pair
    if not ours.chat_template:
        assert name == "gemma3-270m"  # the base model ships none
        with pytest.raises(ValueError, match="no chat template"):
            ours.encode_chat(CHAT)
        return
    for messages in (CHAT, CHAT[1:2]):
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected
            assert ours.encode_chat(messages, add_generation_prompt=gen) == list(expected)


def test_stop_ids_cover_end_of_turn(pair):
    name, ours, _ = pair
    assert ours.eos_id in ours.stop_ids
    if ours.chat_template:
        assert ours.backend.token_to_id("<|im_end|>") in ours.stop_ids


@pytest.mark.parametrize("text", ["中文流式输出测试，一个字一个字地出来。", "emoji 🙂👍🏽🤖 and ünïcode ∑∫", "混合 text 🙂 混合"])
def test_incremental_detokenizer_never_breaks_characters(pair, text):
    _, ours, _ = pair
    prompt = ours.encode("Say:")
    ids = ours.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, prompt)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids)


def test_infill_prompts_wrap_prefix_and_suffix_in_the_fim_tokens():
    path = model_path("qwen2.5-coder-0.5b")
    tok = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    ids, _ = tok.encode_infill("def f(x):\n", "\n\nprint(f(2))\n")
    pre, suf, mid = (tok.backend.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert ids == [pre, *tok.encode("def f(x):\n"), suf, *tok.encode("\n\nprint(f(2))\n"), mid]
    path = model_path("smollm2-135m")
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        Tokenizer.from_gguf(GGUFFile(path).metadata, path).encode_infill("a", "b")
