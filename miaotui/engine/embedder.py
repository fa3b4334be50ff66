"""Embeddings: texts → token ids → packed batches through an encoder → pooled, optionally truncated (Matryoshka)
and normalized vectors. Inputs are sorted by length and cut into batches by a token budget, so one call with many
texts costs a few large matrix products rather than many small ones, and no pad token is ever computed."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miaotui.config import POOLINGS, resolve_device, resolve_dtype
from miaotui.errors import MiaotuiError
from miaotui.loader.encoder import LoadedEncoder, load_encoder


@dataclass(frozen=True, slots=True)
class EmbeddingOutput:
    embedding: list[float]
    prompt_tokens: int


class Embedder:
    """An encoder model ready to embed; thread-safe (one batch runs at a time)."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_batch_tokens: int = 8192,
                 threads: int | None = None, pooling: str | None = None):
        """`pooling` overrides how the model's files say its vector is made (one of POOLINGS), as llama-server's
        `--pooling` and vLLM's pooler config do; a model trained with another gives poorer vectors."""
        if pooling is not None and pooling not in POOLINGS:
            raise MiaotuiError(f"pooling {pooling!r} is not supported ({', '.join(POOLINGS)})")
        if threads is not None:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        self.loaded: LoadedEncoder = load_encoder(model, dev, resolve_dtype(dtype, dev))
        self.config = self.loaded.config
        if pooling is not None:
            self.config.pooling = pooling
        self.model_name = self.loaded.files.name
        self.max_tokens = self.loaded.max_tokens
        self.max_batch_tokens = max(max_batch_tokens, self.max_tokens)
        self.device = dev
        self._lock = threading.Lock()

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.loaded.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.dimensions and not self.config.matryoshka:
            return
        if not self.config.matryoshka:
            raise MiaotuiError(f"{self.model_name} returns {self.dimensions}-dimensional embeddings only; it was "
                               "not trained for shorter ones (`dimensions`)")
        low = self.config.matryoshka[0]
        if not low <= dimensions <= self.dimensions:
            raise MiaotuiError(f"dimensions must be from {low} to {self.dimensions} for {self.model_name} "
                               f"(trained for {', '.join(map(str, self.config.matryoshka))}), got {dimensions}")

    def embed(self, inputs: Sequence[str] | Sequence[list[int]], dimensions: int | None = None,
              truncate: int | None = None) -> list[EmbeddingOutput]:
        """One vector per input (a text, or token ids with the special tokens already in place). An input longer
        than the model takes is refused unless `truncate` (a token count, -1 for the model's limit) cuts it."""
        self.check_dimensions(dimensions)
        ids = self.tokenize(inputs) if inputs and isinstance(inputs[0], str) else [list(x) for x in inputs]
        limit = self.max_tokens if truncate is None or truncate < 0 else min(truncate, self.max_tokens)
        for i, seq in enumerate(ids):
            if not seq:
                raise MiaotuiError(f"input {i} is empty")
            if len(seq) > limit:
                if truncate is None:
                    raise MiaotuiError(f"input {i} is too large: {len(seq)} tokens, more than the {self.max_tokens} "
                                       f"{self.model_name} takes (truncate_prompt_tokens cuts it)")
                ids[i] = seq[: limit - 1] + seq[-1:]  # keep the closing [SEP]
            if max(seq) >= self.config.vocab_size or min(seq) < 0:
                raise MiaotuiError(f"input {i} holds a token id outside the vocabulary")
        vectors: list[torch.Tensor | None] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        with self._lock, torch.inference_mode():
            start = 0
            while start < len(order):
                batch, tokens = [], 0
                while start < len(order) and (not batch or tokens + len(ids[order[start]]) <= self.max_batch_tokens):
                    batch.append(order[start])
                    tokens += len(ids[order[start]])
                    start += 1
                pooled = self._forward([ids[i] for i in batch], dimensions)
                for i, v in zip(batch, pooled):
                    vectors[i] = v
        return [EmbeddingOutput(v.tolist(), len(seq)) for v, seq in zip(vectors, ids)]

    def _forward(self, batch: list[list[int]], dimensions: int | None) -> torch.Tensor:
        lengths = [len(s) for s in batch]
        flat = torch.tensor([t for s in batch for t in s], device=self.device)
        hidden = self.loaded.model(flat, lengths).float()
        counts = torch.tensor(lengths, device=self.device)
        if self.config.pooling in ("cls", "last"):  # one token of each sequence: its first or its last
            ends = counts.cumsum(0)
            pooled = hidden[ends - counts if self.config.pooling == "cls" else ends - 1]
        else:  # mean over each sequence's tokens
            seg = torch.repeat_interleave(torch.arange(len(batch), device=self.device), counts)
            pooled = torch.zeros(len(batch), hidden.shape[1], device=self.device).index_add_(0, seg, hidden)
            pooled /= counts[:, None]
        if dimensions is not None and self.config.matryoshka:
            # the recipe Matryoshka models are trained with: layer-normalize, cut, then unit length
            pooled = F.layer_norm(pooled, (pooled.shape[1],))[:, :dimensions]
            return F.normalize(pooled, dim=-1)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled
