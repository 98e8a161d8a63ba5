"""A collisionless map from (feature, raw int64 id) to rows, vectorised over tensors.

Open addressing with linear probing over ``C`` slots (a power of two, at least twice the
rows): slot s holds a key (feature ``key_f[s]``, id ``key_id[s]``) and its row
``slot_row[s]``; ``key_f`` is -1 for an empty slot and -2 for a deleted one (a tombstone,
which probes pass over and inserts may reuse).  Every operation probes all its keys at
once, one probe step per round, so the Python loop runs over probe rounds (a few at
load <= 1/2), never over ids.  Rows come from a free list and are handed out in the
order the keys were first seen.  All state lives in buffers, so ``state_dict`` holds the
map.  The building block of collisionless dynamic tables (Monolith: Liu et al., 2022).

This is the pure-torch reference: measured here (2 threads, 1M rows full, 26 x 4096
Zipf ids a batch) at ~6M ids/s for lookups and ~0.4M ids/s for inserts with the table
full, far below the ~30M ids/s a training step needs; a compiled kernel with the same
results is still to come.

Shapes: N keys, C slots, M rows.
"""
from __future__ import annotations

import torch
from torch import nn

from rectables import hashing

EMPTY, DELETED = -1, -2
_FEATURE_MUL = hashing._signed(hashing.GOLDEN)  # spreads the feature index over 64 bits


class IdMap(nn.Module):
    """(feature, id) -> row in [0, M), at most M keys, no two keys on one row."""

    def __init__(self, max_rows: int, seed: int = 0) -> None:
        super().__init__()
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        slots = 1 << max(4, (2 * max_rows - 1).bit_length())
        self.max_rows = int(max_rows)
        self.register_buffer("key", torch.tensor(hashing.salt_key(seed, 1 << 20), dtype=torch.int64))
        self.register_buffer("key_f", torch.full((slots,), EMPTY, dtype=torch.int32))
        self.register_buffer("key_id", torch.zeros(slots, dtype=torch.int64))
        self.register_buffer("slot_row", torch.full((slots,), -1, dtype=torch.int64))
        self.register_buffer("row_slot", torch.full((max_rows,), -1, dtype=torch.int64))  # -1: row free
        self.register_buffer("free", torch.arange(max_rows - 1, -1, -1, dtype=torch.int64))  # a stack
        self.register_buffer("num_free", torch.tensor(max_rows, dtype=torch.int64))

    @property
    def size(self) -> int:
        """Keys held."""
        return self.max_rows - int(self.num_free)

    def _home(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return hashing.bucket(ids ^ (f.to(torch.int64) * _FEATURE_MUL), self.key, self.key_f.numel())

    def _probe(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Slot [N] of each key (f [N], ids [N]), -1 if it is not in the map."""
        n, mask = ids.numel(), self.key_f.numel() - 1
        found = torch.full((n,), -1, dtype=torch.int64)
        pos = self._home(f, ids)
        todo = torch.arange(n)
        while todo.numel():
            p = pos[todo]
            kf = self.key_f[p]
            hit = (kf == f[todo]) & (self.key_id[p] == ids[todo])
            found[todo[hit]] = p[hit]
            go_on = ~hit & (kf != EMPTY)  # an empty slot ends the probe path; tombstones do not
            todo = todo[go_on]
            pos[todo] = (p[go_on] + 1) & mask
        return found

    def lookup(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows [N] of keys (f [N], ids [N]); -1 where a key is not in the map."""
        found = self._probe(f, ids)
        return torch.where(found >= 0, self.slot_row[found.clamp(min=0)], found)

    def insert(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Give each key not yet in the map a free row, in the order keys first appear;
        returns the rows [N] of all keys (-1 for keys left out when rows ran out)."""
        f = f.to(torch.int64)
        first, where = _first_seen(f, ids)
        uf, uid = f[first], ids[first]
        found = self._probe(uf, uid)
        rows = torch.where(found >= 0, self.slot_row[found.clamp(min=0)], found)
        new = (found < 0).nonzero().squeeze(1)[: int(self.num_free)]  # first seen first
        if new.numel():
            n = int(self.num_free)
            given = self.free[n - new.numel() : n].flip(0)
            self.num_free -= new.numel()
            slots = self._claim(uf[new], uid[new])
            self.key_f[slots], self.key_id[slots] = uf[new].to(torch.int32), uid[new]
            self.slot_row[slots], self.row_slot[given] = given, slots
            rows[new] = given
        return rows[where]

    def _claim(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A distinct vacant slot on each new key's probe path [K] (keys not in the map)."""
        k, mask = ids.numel(), self.key_f.numel() - 1
        pos = self._home(f, ids)
        slot = torch.full((k,), -1, dtype=torch.int64)
        taken = torch.zeros(self.key_f.numel(), dtype=torch.bool)
        todo = torch.arange(k)
        while todo.numel():
            p = pos[todo]
            vacant = (self.key_f[p] < 0) & ~taken[p]
            # among keys wanting one vacant slot this round, the first one wins it
            owner = torch.full((self.key_f.numel(),), k, dtype=torch.int64)
            owner.scatter_reduce_(0, p[vacant], todo[vacant], reduce="amin")
            won = vacant & (owner[p] == todo)
            slot[todo[won]] = p[won]
            taken[p[won]] = True
            todo = todo[~won]
            pos[todo] = (p[~won] + 1) & mask
        return slot

    def remove_rows(self, rows: torch.Tensor) -> None:
        """Forget the keys on ``rows`` [R] (rows in use) and put the rows back on the free list."""
        rows = torch.unique(rows)
        slots = self.row_slot[rows]
        if (slots < 0).any():
            raise ValueError("remove_rows: some rows hold no key")
        self.key_f[slots] = DELETED
        self.slot_row[slots] = -1
        self.row_slot[rows] = -1
        n = int(self.num_free)
        self.free[n : n + len(rows)] = rows.flip(0)
        self.num_free += len(rows)
        if int((self.key_f == DELETED).sum()) > self.key_f.numel() // 4:  # long probe paths: rebuild
            self._rebuild()

    def _rebuild(self) -> None:
        """Every live key placed again in a table without tombstones (rows unchanged)."""
        live = (self.key_f >= 0).nonzero().squeeze(1)
        f, ids, rows = self.key_f[live].to(torch.int64), self.key_id[live], self.slot_row[live]
        self.key_f.fill_(EMPTY)
        self.slot_row.fill_(-1)
        slots = self._claim(f, ids)
        self.key_f[slots], self.key_id[slots], self.slot_row[slots] = f.to(torch.int32), ids, rows
        self.row_slot[rows] = slots


def _first_seen(f: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each distinct key's first occurrence, in order of first occurrence [U];
    for each key [N], the position of its distinct key in that order)."""
    pairs = torch.stack([f, ids], dim=1)
    uniq, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), ids.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return first[order], rank[inverse]
