"""Prompt KV shared across requests: a prefix computed once serves every later prompt that
starts with it (GRPO groups, multi-turn histories that resend their past), per weights.

Entries are keyed by the weights they were computed with (`weights`: adapter id AND its
version, so a snapshot re-taken under the same id never hits an older entry) and by the
prompt's tokens in blocks of `block` tokens: an entry of L tokens answers any prompt whose
first k * block tokens (k * block <= L) equal its own. Memory is bounded by `budget_bytes`;
the least recently used entries are evicted first. Stored tensors are never modified (the
decode batch copies them), so an entry evicted while in use stays valid for its users.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), (1, heads, L, dim)


@dataclass
class _Entry:
    weights: str
    tokens: tuple[int, ...]
    kv: KV
    nbytes: int
    index_keys: list[tuple[str, int, int]]


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    entries: int = 0
    bytes: int = 0


def _chain(tokens: list[int], block: int, upto: int) -> list[int]:
    """Hash of each block-aligned prefix: h_k covers tokens[:k * block], k = 1..upto // block."""
    hashes = []
    h = 0
    for k in range(upto // block):
        h = hash((h, tuple(tokens[k * block : (k + 1) * block])))
        hashes.append(h)
    return hashes


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16) -> None:
        self.budget_bytes = budget_bytes
        self.block = block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order, oldest first
        self._index: dict[tuple[str, int, int], int] = {}  # (weights, length, hash) -> entry
        self._next = 0
        self.stats = PrefixCacheStats()

    def lookup(self, weights: str, tokens: list[int], limit: int) -> tuple[int, KV | None]:
        """The longest cached block-aligned prefix of `tokens` of at most `limit` tokens:
        (its length, its KV sliced to that length), or (0, None)."""
        self.stats.lookups += 1
        hashes = _chain(tokens, self.block, min(limit, len(tokens)))
        for k in range(len(hashes), 0, -1):
            length = k * self.block
            entry_id = self._index.get((weights, length, hashes[k - 1]))
            if entry_id is None:
                continue
            entry = self._entries[entry_id]
            if list(entry.tokens[:length]) != tokens[:length]:
                continue  # a hash collision: never serve another prompt's KV
            self._entries.move_to_end(entry_id)
            self.stats.hits += 1
            self.stats.hit_tokens += length
            return length, [(k_[:, :, :length], v[:, :, :length]) for k_, v in entry.kv]
        return 0, None

    def count_shared(self, tokens: int) -> None:
        """A prompt served by a concurrent request's prefill (same weights and prompt,
        admitted together): a lookup and a hit of `tokens` tokens."""
        self.stats.lookups += 1
        self.stats.hits += 1
        self.stats.hit_tokens += tokens

    def insert(self, weights: str, tokens: list[int], kv: KV) -> None:
        """Store the KV of `tokens` (as many whole blocks as it holds; copied)."""
        length = len(tokens) // self.block * self.block
        if length == 0 or self.budget_bytes <= 0:
            return
        hashes = _chain(tokens, self.block, length)
        if self._index.get((weights, length, hashes[-1])) is not None:
            return  # already cached whole
        stored = [
            (k[:, :, :length].contiguous().clone(), v[:, :, :length].contiguous().clone())
            for k, v in kv
        ]
        nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in stored)
        if nbytes > self.budget_bytes:
            return
        while self._entries and self.stats.bytes + nbytes > self.budget_bytes:
            self._evict()
        entry_id = self._next
        self._next += 1
        keys = [(weights, (i + 1) * self.block, h) for i, h in enumerate(hashes)]
        self._entries[entry_id] = _Entry(weights, tuple(tokens[:length]), stored, nbytes, keys)
        for key in keys:
            self._index[key] = entry_id  # the newest entry answers a shared prefix
        self.stats.bytes += nbytes
        self.stats.entries = len(self._entries)

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        for key in entry.index_keys:
            if self._index.get(key) == entry_id:
                # Another live entry may hold the same prefix: let it answer from now on.
                del self._index[key]
                for other_id in reversed(self._entries):
                    if key in self._entries[other_id].index_keys:
                        self._index[key] = other_id
                        break
        self.stats.bytes -= entry.nbytes
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.stats.bytes = 0
        self.stats.entries = 0
