"""The paged KV cache's bookkeeping: fixed-size blocks, per-sequence block tables, and prefix reuse.

A full block is named by the hash of (its parent block's hash, its token ids), so equal prefixes map to equal
blocks. Blocks carry reference counts; a block nobody uses keeps its contents and hash until it is handed out
again, so a later request with the same prefix can take it back. Handing out prefers blocks that hold nothing
reusable, the most recently freed first (their memory is resident and likely still in the CPU's caches; a cache
budget is only touched as far as the load needs it), and only then evicts cached blocks, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from miaotui.engine.sequence import Sequence


def chain_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """A full block's name: its parent's name and its tokens. Python hashes int tuples the same in every process,
    so a router in another process names a prompt's blocks as the replica's cache does."""
    return hash((parent, tokens))


def prefix_hashes(token_ids: list[int], block_size: int, max_blocks: int) -> list[int]:
    """The names of the first (at most `max_blocks`) full blocks of a prompt, as the prefix cache names them."""
    hashes, parent = [], 0
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        parent = chain_hash(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.empty: list[int] = list(range(num_blocks - 1, -1, -1))  # free, nothing to reuse: a stack
        self.cached: OrderedDict[int, None] = OrderedDict()  # free, with a hash: least recently freed first
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Blocks handed out for the first time: their memory was never written and may hold NaNs, which a masked
        # attention weight of 0 would still turn into NaN. The runner zeroes them before the next forward pass.
        self.fresh: list[int] = []
        self._used = [False] * num_blocks
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found

    # -- queries ----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.empty) + len(self.cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    # -- prefix reuse -----------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """seq.block_hashes, extended to cover at least its first `num_blocks` full blocks ((hash, tokens), each
        hash chained on its parent's): a decode step hashes only the block that just filled, and copies nothing."""
        memo, bs = seq.block_hashes, self.block_size
        parent = memo[-1][0] if memo else 0
        for i in range(len(memo), num_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, tokens)
            memo.append((parent, tokens))
        return memo

    def match_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest cached prefix; return the tokens they hold (the
        caller counts them as computed).

        At least one token is always left to compute, so the step that follows produces the next token's logits.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.num_computed:
            return 0
        if seq.params.prompt_logprobs is not None:  # its prompt's every position is scored: none can be skipped
            return 0
        full = (seq.num_tokens - 1) // self.block_size
        for h, tokens in self._hashes(seq, full)[:full]:
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            if self.ref_count[block] == 0:
                del self.cached[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        return len(seq.block_table) * self.block_size

    def count_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's lookup in the hit rate (one that waits looks up again when it is admitted)."""
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached_prompt

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        hashes = self._hashes(seq, full)
        for i in range(seq.num_committed, full):
            block, (h, tokens) = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.block_tokens[block] = tokens
                self.hash_to_block[h] = block
        seq.num_committed = max(seq.num_committed, full)

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold `num_tokens` tokens; the caller checked `can_allocate`."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self.empty.pop() if self.empty else self.cached.popitem(last=False)[0]
            h = self.block_hash[block]
            if h is not None:  # evict: its old contents are about to be overwritten
                if self.hash_to_block.get(h) == block:
                    del self.hash_to_block[h]
                self.block_hash[block] = None
                self.block_tokens[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)
            if not self._used[block]:
                self._used[block] = True
                self.fresh.append(block)

    def release(self, seq: Sequence) -> None:
        """Drop seq's claim on its blocks. Cached ones are evicted tail first (the prefix's head is shared most)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is None:
                    self.empty.append(block)
                else:
                    self.cached[block] = None
        seq.block_table = []
        seq.num_committed = 0

    def reset_prefix_cache(self) -> None:
        for block in self.cached:
            self.block_hash[block] = None
            self.block_tokens[block] = None
            self.empty.append(block)
        self.cached.clear()
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_count[b] > 0}
