"""The draft-model proposer: a small model of the same vocabulary (Qwen2.5-Coder-0.5B for the 1.5B) runs k greedy
steps per round on its own runner and paged cache. Each request has a shadow sequence there; after the model has
checked the proposals, the shadow keeps the cache entries of the tokens both agree on and recomputes from there.

Where the text's last LOOKUP_MIN or more tokens occurred before in it (an answer copying its prompt: code edits,
summaries, quotes), their continuation there is the proposal and no draft pass runs: a lookup costs nothing, and a
draft pass ~0.3 of the model's step. The draft catches up on those tokens at its next pass. A request that makes
no draft pass (its draft stopped paying, or would not pay back its first pass) looks up down to
`prompt_lookup_min` tokens, as the n-gram method does. (Qwen2.5-Coder-1.5B with the 0.5B in int4, code edits: 1.35x
plain decode with the draft alone, 1.69x with the lookup first.)

Of a long prompt the draft reads only the first HEAD tokens and the last TAIL, then every token since: its first
pass over the prompt was the largest cost left (~0.4 s for a 300-token code edit against ~4 s of answer), and a guesser
needs little context where the lookup above copies from the whole text. Its products round activations to one int8
term (llama.cpp's choice; `activation_bits` 8): its catch-up rows and prompt cost 0.7-0.8 the time, and a guess needs
no 15-bit activations. (Qwen2.5-Coder-1.5B, 0.5B draft in int4, Zen 4, plain and variants alternated per prompt in
one engine: code edit 1.47x plain decode with the whole prompt, 1.62x at 8 bits, 1.76-1.99x with the window too;
QA over a passage 1.23x, 1.45x, 1.87-1.90x; summarize 1.03x, 1.15x, 1.21x; chat 0.97x, 0.99x, 1.02x.)

The draft's output head scores only a shortlist of the vocabulary (FR-Spec's idea): a byte-level BPE vocabulary's
ids are in merge order, most frequent first, and a large one's head is a third of a small model's bytes
(Qwen2.5-Coder-0.5B: 153 of its 491 MB, for 151,936 tokens). Its first SHORTLIST tokens and the special ones (which
end turns) cover nearly all text, and a token outside is only a proposal that fails: the check keeps the output exact.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from miaotui.config import SpeculativeConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.runner import ModelRunner, kv_bytes_per_token
from miaotui.engine.sequence import Sequence, Status
from miaotui.engine.speculative import NgramIndex, Proposer, pass_seconds
from miaotui.errors import MiaotuiError
from miaotui.kernels import argmax
from miaotui.loader import load
from miaotui.quant import recipe
from miaotui.sampling import SamplingParams

log = logging.getLogger("miaotui")
CATCH_UP_ROWS = 16  # a shadow this many tokens behind or fewer catches up as decode rows
LOOKUP_MIN = 3  # a match of this many tokens or more in the text so far proposes its continuation, with no draft pass
PAYBACK = 8  # a request starts the draft only with a token to go for every this many of its text (`_pays_back`)
SHORTLIST = 32768  # the draft's head scores this many of the vocabulary's first tokens (where it has twice as many)
HEAD, TAIL = 16, 48  # of a longer prompt the draft reads the first HEAD tokens (attention sinks) and the last TAIL


def shortlist(tokenizer, vocab_size: int) -> torch.Tensor | None:
    """The token ids the draft proposes from: the first SHORTLIST and every added (special) one; None where the
    vocabulary is not much larger than that."""
    if vocab_size < 2 * SHORTLIST:
        return None
    added = [*tokenizer.backend.get_added_tokens_decoder(), *tokenizer.stop_ids]
    special = {i for i in added if SHORTLIST <= i < vocab_size}
    return torch.tensor([*range(SHORTLIST), *sorted(special)])


class DraftModelProposer(Proposer):
    retries = False  # a try after a pause would first read every token since: where it stops paying, lookups go on

    def __init__(self, config: SpeculativeConfig, engine):
        loaded = load(config.model, engine.device, engine.dtype)
        if loaded.tokenizer.backend.get_vocab() != engine.tokenizer.backend.get_vocab():
            raise MiaotuiError(f"draft model {config.model!r} has another vocabulary than {engine.loaded.files.name!r}"
                               "; a draft model must share the model's tokenizer")
        recipe.apply(loaded.model, config.quantization or engine.config.quantization, engine.config.group_size,
                     engine.dtype, engine.device)
        recipe.round_activations(loaded.model, 8)
        self.head_ids = shortlist(engine.tokenizer, loaded.config.vocab_size)
        if self.head_ids is not None:
            self.head_ids = self.head_ids.to(engine.device)
            recipe.shortlist_head(loaded.model, self.head_ids, engine.dtype)
        block_size = engine.config.block_size
        # room for the requests that speculate, never more tokens than the model's own cache holds
        tokens = min((config.disable_by_batch_size + 1) * engine.max_model_len, engine.kv.num_blocks * block_size)
        num_blocks = -(-tokens // block_size) + 1
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(loaded.model, num_blocks, block_size, engine.dtype, engine.device)
        self.shadows: dict[int, Sequence] = {}  # id(target sequence) -> its sequence in the draft's cache
        self.lookup_only: set[int] = set()  # id(target sequence) of requests whose draft passes stopped paying
        self.lookup_min, self.lookup_max = config.prompt_lookup_min, config.prompt_lookup_max
        self.lookups: dict[int, NgramIndex] = {}  # id(target sequence) -> its text's n-grams
        log.info("draft model %s: %d KV blocks (%.0f MiB)", loaded.files.name, num_blocks,
                 num_blocks * block_size * kv_bytes_per_token(loaded.config, engine.dtype) / 2**20)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        self.overhead = 0.0
        drafts: list[list[int]] = [[] for _ in seqs]
        rest = []
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            index = self.lookups.setdefault(id(seq), NgramIndex(min(LOOKUP_MIN, self.lookup_min),
                                                                max(LOOKUP_MIN, self.lookup_max)))
            dear = id(seq) not in self.lookup_only and (id(seq) in self.shadows or self._pays_back(seq))
            found = index.lookup(seq.token_ids, k, LOOKUP_MIN if dear else self.lookup_min)
            if len(found) == k or not dear:
                drafts[i] = found
            else:
                rest.append(i)
        for i, draft in zip(rest, self._draft([seqs[i] for i in rest], [ks[i] for i in rest])):
            drafts[i] = draft
        return drafts

    @staticmethod
    def _pays_back(seq: Sequence) -> bool:
        """Whether a request's tokens to go can pay back the draft's first pass over its text (Qwen2.5-Coder-0.5B
        in int4: ~1.3 ms a token, where a proposal that holds saves ~7 ms of the 1.5B's step): a request a few tokens
        from its `max_tokens` would pay that for a handful of proposals."""
        left = seq.params.max_tokens
        return left is None or (left - len(seq.output_ids)) * PAYBACK >= len(_text(seq))

    def _draft(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """k greedy steps of the draft model for each sequence."""
        shadows = [self._shadow(s) for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for step in range(max(ks, default=0)):
            active = [i for i in active if ks[i] > step and self._room(shadows[i])]
            if not active:
                break
            rows = [shadows[i] for i in active]
            for sh in rows:  # a short catch-up (the tokens the model took last step) as decode rows: the fast path
                behind = sh.num_tokens - sh.num_computed
                if 1 < behind <= CATCH_UP_ROWS:
                    sh.draft = sh.token_ids[sh.num_computed + 1:]
                    del sh.token_ids[sh.num_computed + 1:]
            start, prompt = time.perf_counter(), any(sh.num_computed == 0 for sh in rows)
            logits = self.runner.forward(rows, [len(sh.draft) + 1 if sh.draft else sh.num_tokens - sh.num_computed
                                                for sh in rows])
            last = list(itertools.accumulate((len(sh.draft) + 1 for sh in rows)))
            tokens = argmax(logits[[n - 1 for n in last]])
            if prompt:  # a request's first pass reads its prompt: once a request, not the price of a proposal
                self.overhead += time.perf_counter() - start
            if self.head_ids is not None:
                tokens = self.head_ids[tokens]
            for i, sh, token in zip(active, rows, tokens.tolist()):
                sh.token_ids.extend(sh.draft)
                sh.draft = []
                sh.num_computed = sh.num_tokens
                sh.token_ids.append(token)
                drafts[i].append(token)
        return drafts

    def seconds(self) -> float:
        """A draft step of one row."""
        return pass_seconds(self.runner, self.kv, [0])[0]

    def stop_dear(self, seq: Sequence) -> bool:
        """No more draft passes for the request (its shadow's cache given back); its lookups go on."""
        self.lookup_only.add(id(seq))
        shadow = self.shadows.pop(id(seq), None)
        if shadow is not None:
            self.kv.release(shadow)
        return True

    def release(self, seq: Sequence) -> None:
        self.lookup_only.discard(id(seq))
        self.lookups.pop(id(seq), None)
        shadow = self.shadows.pop(id(seq), None)
        if shadow is not None:
            self.kv.release(shadow)

    def _shadow(self, seq: Sequence) -> Sequence:
        """The request's shadow with the target's tokens: its cache kept as far as both texts agree."""
        shadow = self.shadows.get(id(seq))
        if shadow is None:
            shadow = Sequence(seq.request_id, [], 0, SamplingParams(max_tokens=1), None,  # type: ignore[arg-type]
                              status=Status.RUNNING)
            self.shadows[id(seq)] = shadow
        old, new = shadow.token_ids, _text(seq)
        same = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        shadow.num_computed = min(shadow.num_computed, same, len(new) - 1)
        shadow.token_ids = new
        return shadow

    def _room(self, shadow: Sequence) -> bool:
        """Blocks for the shadow's tokens; when the cache is full, shadows of other requests give theirs up."""
        need = shadow.num_tokens
        for other in list(self.shadows.values()):
            if self.kv.can_allocate(shadow, need):
                break
            if other is not shadow and other.block_table:
                self.kv.release(other)
                other.num_computed = 0
        if not self.kv.can_allocate(shadow, need):
            return False
        self.kv.allocate(shadow, need)
        self.runner.zero_blocks(self.kv.fresh)
        self.kv.fresh = []
        return True


def _text(seq: Sequence) -> list[int]:
    """A request's text as the draft reads it (a new list): a long prompt's head and tail, then every token since."""
    ids, cut = seq.token_ids, seq.num_prompt - TAIL
    return ids[:HEAD] + ids[cut:] if cut > HEAD else list(ids)
