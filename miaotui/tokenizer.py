"""Tokenization: a `tokenizers` BPE rebuilt from a GGUF vocabulary (or tokenizer.json), chat templates with
jinja2, and an incremental detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from miaotui.errors import MiaotuiError, ModelFileError

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre`, as llama.cpp applies them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# Tokens that end a turn in the chat formats we know; generation stops on them as on EOS.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>")
# Fill-in-the-middle tokens (prefix, suffix, middle) as code models name them (Qwen2.5-Coder and CodeGemma; StarCoder;
# SantaCoder; DeepSeek-Coder), and the tokens that end a middle besides the turn's end (llama.cpp stops there too).
_FIM = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"), ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))
_FIM_END = ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<fim_pad>", "<file_sep>", "<repo_name>", "<fim-pad>")
_CONTROL, _USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str) -> tuple[Any, Any]:
    """(normalizer, pre-tokenizer) for a byte-level vocabulary, following llama.cpp's per-model rules."""
    if pre == "smollm":  # digits one by one, then GPT-2's pattern
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    split = _SPLITS.get(pre)
    if split is None:
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    normalizer = normalizers.NFC() if split is _QWEN2_SPLIT else None
    return normalizer, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _build_byte_level(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    alphabet = set(_bytes_to_unicode().values())
    spell = _bytes_to_unicode()
    if set("".join(tokens)) <= alphabet:  # llama.cpp's converters store them spelled already: one check, not 150k
        vocab = dict(zip(tokens, range(len(tokens))))
    else:
        vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.normalizer, tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges a SentencePiece-BPE vocabulary implies: every split of a token into two known pieces.

    Ranked by the merged token's position in the vocabulary (Gemma's scores do not follow its merge order,
    its token order does), longer left piece first within a token — the order transformers derives too.
    """
    ranked = []
    for token, index in vocab.items():
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, -len(left), left, right))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(left, right) for _, _, left, right in ranked]


def _build_sentencepiece(tokens: list[str], unk: str) -> HFTokenizer:
    # Gemma stores runs of spaces as raw spaces; the vocabulary looks them up as "▁" runs.
    spelled = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(vocab), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def wordpiece_from_gguf(tokens: list[str], unk: str = "[UNK]") -> HFTokenizer:
    """BERT's uncased WordPiece from a GGUF vocabulary (encoders). llama.cpp's converter marks word starts with "▁"
    and drops the "##" of continuations; undone here, the vocabulary is BERT's own again."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t.startswith("[") and t.endswith("]"):
            vocab[t] = i
        else:
            vocab[t[1:] if t.startswith("\u2581") else "##" + t] = i
    tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _add_special(tok: HFTokenizer, tokens: list[str], types: list[int] | None, byte_level: bool) -> None:
    """Control tokens stay whole and are special; user-defined ones stay whole but are plain text."""
    if types is None:
        return
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and tok.token_to_id(t) is not None]  # (get_vocab: 0.3 s for a 150k vocabulary)
    tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


@dataclass
class Tokenizer:
    """Text ↔ token ids, plus what generation needs to know: BOS, the ids that end a turn, the chat template."""

    backend: HFTokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    stop_ids: set[int] = field(default_factory=set)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict[str, Any], path: str | Path = "") -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelFileError(f"{path}: the GGUF file carries no tokenizer vocabulary")
        if kind not in ("gpt2", "llama"):
            raise ModelFileError(f"{path}: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
        try:
            types = meta.get("tokenizer.ggml.token_type")
            types = None if types is None else [int(t) for t in types]
            if kind == "gpt2":
                backend = _build_byte_level(tokens, meta.get("tokenizer.ggml.merges", []),
                                            meta.get("tokenizer.ggml.pre", "default"))
            else:
                unk_id = meta.get("tokenizer.ggml.unknown_token_id")
                backend = _build_sentencepiece(tokens, tokens[unk_id] if unk_id is not None else "<unk>")
            _add_special(backend, tokens, types, byte_level=kind == "gpt2")
        except Exception as e:  # the tokenizers library raises bare Exception on a bad vocabulary or merge list
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise ModelFileError(f"{path}: corrupt tokenizer in the GGUF metadata ({first_line})") from None
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls._finish(backend, bos, eos, add_bos, meta.get("tokenizer.chat_template"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json for the model, tokenizer_config.json for BOS/EOS and template."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ModelFileError(f"{folder}: no tokenizer.json in the model folder")
        try:
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ModelFileError(f"{folder / 'tokenizer.json'}: not a valid tokenizer ({_first_line(e)})") from None
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((folder / "tokenizer_config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelFileError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise ModelFileError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")

        def token_id(key: str) -> int | None:
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if value else None

        template = cfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        # A post-processor in tokenizer.json (e.g. Llama 3's TemplateProcessing) adds BOS by itself.
        add_bos = bool(cfg.get("add_bos_token", False)) and backend.post_processor is None
        return cls._finish(backend, token_id("bos_token"), token_id("eos_token"), add_bos, template)

    @classmethod
    def _finish(cls, backend, bos, eos, add_bos, template) -> Tokenizer:
        stop = {int(eos)} if eos is not None else set()
        for name in _END_OF_TURN:
            i = backend.token_to_id(name)
            if i is not None:
                stop.add(i)
        return cls(backend, None if bos is None else int(bos), None if eos is None else int(eos),
                   add_bos and bos is not None, template, stop)

    def save(self, folder: Path) -> None:
        """tokenizer.json and tokenizer_config.json, as `from_folder` (and transformers) read them back."""
        folder = Path(folder)
        backend = self.backend
        if self.add_bos and backend.post_processor is None:  # make BOS part of tokenizer.json, as transformers
            from tokenizers.processors import TemplateProcessing  # ignores add_bos_token in tokenizer_config

            bos = self._text(self.bos_id)
            backend = HFTokenizer.from_str(backend.to_str())
            backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, self.bos_id)])
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self.config(), indent=2, ensure_ascii=False) + "\n")

    def config(self) -> dict[str, Any]:
        """What transformers' tokenizer_config.json holds for this tokenizer: BOS/EOS, whether BOS is added, the chat
        template (written by `save`, and served as vLLM's /tokenizer_info for clients such as lm-eval)."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                "bos_token": self._text(self.bos_id) or None, "eos_token": self._text(self.eos_id) or None,
                "chat_template": self.chat_template}

    # -- use --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    def encode_infill(self, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
        """A fill-in-the-middle prompt — the code before the gap, the code after it, then the model writes the gap —
        built from the vocabulary's FIM tokens as llama.cpp's /infill builds it, and the tokens that end the gap
        besides the usual ends. ValueError where the vocabulary has no FIM tokens."""
        names = fim_tokens(lambda n: self.backend.token_to_id(n) is not None)
        if names is None:
            raise ValueError("this model has no fill-in-the-middle tokens (such as <|fim_prefix|>): a suffix needs a "
                             "code model trained to fill gaps, e.g. qwen2.5-coder-1.5b")
        pre, suf, mid = (self.backend.token_to_id(n) for n in names)
        ids = ([self.bos_id] if self.add_bos else []) + [pre, *self.encode(prefix, False), suf,
                                                          *self.encode(suffix, False), mid]
        return ids, [i for n in _FIM_END if (i := self.backend.token_to_id(n)) is not None]

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use plain completion (--raw) instead")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id), **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **kwargs) -> list[int]:
        """Token ids of a conversation, as transformers' `apply_chat_template(tokenize=True)` gives them; with
        `continue_final_message` the text ends inside the last (assistant) message, for the model to continue it."""
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        if continue_final_message:
            final = messages[-1].get("content")
            final = final if isinstance(final, str) else ""
            end = text.rfind(final.strip()) if final.strip() else -1
            if end == -1:
                raise ValueError("continue_final_message: the chat template does not show the final message's text")
            text = text[: end + len(final.strip())]
        return self.encode(text, add_special_tokens=False)

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id) or ""


def fim_tokens(known: Callable[[str], bool]) -> tuple[str, str, str] | None:
    """The fill-in-the-middle tokens (prefix, suffix, middle) of a vocabulary (`known`: whether it has a token),
    if it has a set."""
    return next((names for names in _FIM if all(map(known, names))), None)


_TEMPLATES: dict[str, Any] = {}


def chat_template_from(value: str) -> str:
    """A chat template given in place of the model's (`--chat-template`, as in vLLM): a Jinja file's path, or the
    template itself; checked for syntax here, so a typo is an error at start and not at the first request."""
    path = Path(value).expanduser()
    is_text = "{{" in value or "{%" in value
    if not is_text and not path.is_file():
        raise MiaotuiError(f"chat template {value!r}: no such file (give a Jinja file or the template text)")
    text, name = (value, "the chat template") if is_text else (path.read_text(), str(path))
    try:
        _compile(text)
    except TemplateSyntaxError as e:
        raise MiaotuiError(f"{name}: line {e.lineno}: {e.message}") from None
    return text


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _raise(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _compile(source: str):
    """Chat templates render as in transformers: sandboxed, trim_blocks/lstrip_blocks, `raise_exception`."""
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever splitting a UTF-8 character.

    Decodes a short window of recent tokens twice (with and without the newest) and emits the difference, holding
    it back while it ends in U+FFFD (an incomplete byte sequence) — the scheme vLLM and TGI use.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = self.tokenizer.backend.decode
        prefix = dec(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special)
        full = dec(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""
