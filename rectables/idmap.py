"""A collisionless map from (feature, raw int64 id) to rows, for dynamic tables.

Open addressing with linear probing over C slots (load <= 0.7).  A slot is one row of
the ``slots`` buffer [C, 2] int64: (id, meta), where meta is ``(feature << 32) | row``
for a key, -1 for an empty slot and -2 for a deleted key (a tombstone: probes pass over
it, inserts may reuse it), and one entry of ``use`` [C] int64: ``(count << 32) | last``
for a key, -1 for a vacant slot, where ``last`` is the training step that last read the
key (steps < 2^32 - 1) and ``count`` how often it was read (saturating at 2^31 - 1).
Packed so, (count, last) orders as one integer, and eviction reads 8 bytes a slot (a
map whose slots held all four read 32).  Rows come from a free stack (``free``,
``num_free``); the smallest free row is taken first.  Keys hash as

    h(id, f, key) = mix((id XOR f * GOLDEN) XOR key) >> 1     (63 bits, SplitMix64's mix)
    range(h, n)   = ((h >> 32) * n) >> 31                       (in [0, n))

Every operation runs either in the compiled kernels (``rectables/_idmap.c``, built by
``pip install -e .``) or in pure torch, vectorised over keys (the Python loop runs over
probe rounds, never over ids).  Both give the same rows, counts and steps; only the slot
a key sits in may differ, and either path reads a map the other wrote.  All state is in
buffers, so ``state_dict`` holds the map.  Monolith: Liu et al., "Monolith: Real Time
Recommendation System With Collisionless Embedding Table", ORSUM@RecSys 2022.

Shapes: N keys looked up, U distinct missing keys, C slots, M rows.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rectables import hashing

try:
    from rectables import _idmap as _kernels
except ImportError:  # no compiler at install time: the pure-torch path, same results
    _kernels = None

EMPTY, DELETED = -1, -2
MUL = hashing._signed(hashing.GOLDEN)  # spreads the feature index over 64 bits
LOAD = 0.7
LOW32 = 0xFFFFFFFF
COUNT_MAX = (1 << 31) - 1  # a key's count saturates here
MAX_STEP = (1 << 32) - 2  # the last training step a map can record
SAMPLE = 1 << 16  # leading slots eviction's pick reads as a sample of the keys (SAMPLE in _evict.c)


def num_slots(max_rows: int) -> int:
    """Slots C for M rows: load at most 0.7."""
    return max(16, math.ceil(max_rows / LOAD))


def huge_pages(x: torch.Tensor) -> None:
    """Ask the kernel for 2 MB pages under a large buffer not yet written (a large map's
    random probes then miss the TLB less); nothing without the compiled kernels."""
    if _kernels is not None and x.numel() * x.element_size() >= 4 << 20:
        _kernels.huge_pages(x.data_ptr(), x.numel() * x.element_size())


def h63(ids: torch.Tensor, f: torch.Tensor | None, key: int | torch.Tensor) -> torch.Tensor:
    """63-bit hash [N] of keys (ids [N], features [N] or None for feature 0)."""
    y = ids ^ (f * MUL) if f is not None else ids.clone()
    y ^= key
    hashing._mix64_(y)
    return (y >> 1) & ((1 << 63) - 1)


def in_range(h: torch.Tensor, n: int) -> torch.Tensor:
    """63-bit hashes [N] -> [0, n) (n < 2^32)."""
    return ((h >> 32) * n) >> 31


class IdMap(nn.Module):
    """(feature, id) -> row in [0, M), at most M keys, no two keys on one row.

    ``native=False`` forces the pure-torch path (tests compare both)."""

    def __init__(self, max_rows: int, seed: int = 0, native: bool = True) -> None:
        super().__init__()
        if not 1 <= max_rows < 1 << 31:
            raise ValueError(f"max_rows must lie in [1, 2^31), got {max_rows}")
        self.max_rows = int(max_rows)
        self.native = native and _kernels is not None
        self.key = hashing.salt_key(seed, 1 << 20)
        slots = torch.empty(num_slots(max_rows), 2, dtype=torch.int64)
        use = torch.empty(slots.shape[0], dtype=torch.int64)
        for x in (slots, use):
            huge_pages(x)
        slots[:, 0] = 0
        slots[:, 1] = EMPTY
        self.register_buffer("slots", slots)
        self.register_buffer("use", use.fill_(-1))
        self.register_buffer("free", torch.arange(max_rows - 1, -1, -1, dtype=torch.int64))  # a stack
        self.register_buffer("num_free_", torch.tensor(max_rows, dtype=torch.int64))
        # deleted slots, kept exact as keys come and go (counting them takes a pass over every
        # slot); not saved: counted again when a state is loaded
        self.register_buffer("tombs_", torch.tensor(0, dtype=torch.int64), persistent=False)
        self._scratch = torch.empty(0, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        old = state_dict.get(prefix + "slots")
        if old is not None and old.dim() == 2 and old.shape[1] == 4 and prefix + "use" not in state_dict:
            # a map saved before use left the slots: slots (id, meta, last, count)
            state_dict[prefix + "slots"] = old[:, :2].clone()
            state_dict[prefix + "use"] = torch.where(old[:, 1] >= 0, pack(old[:, 3], old[:, 2]), -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.tombs_.fill_(int((self.slots[:, 1] == DELETED).sum()))

    @property
    def num_free(self) -> int:
        return int(self.num_free_)

    @property
    def size(self) -> int:
        """Keys held."""
        return self.max_rows - self.num_free

    # ---- lookups ---------------------------------------------------------------------
    def find(self, ids: torch.Tensor, f: torch.Tensor | None = None, step: int | None = None):
        """Rows [N] of keys (ids [N], features [N] or None: feature 0), -1 where missing.

        With ``step`` (training): each hit sets its key's last step and adds one to its
        count, and a miss reads -(j + 2), j the index of its key among the U distinct
        missing keys in order of first occurrence; returns (rows, new), new [4, U]: their
        ids, features, occurrences, and a row of scratch for :meth:`settle`."""
        n = ids.numel()
        ids = _i64(ids)
        f = None if f is None else _i64(f)
        if not self.native:
            return _find_torch(self, ids, f, step)
        rows = torch.empty(n, dtype=torch.int64)
        touch = step is not None
        new = torch.empty(4, n if touch else 0, dtype=torch.int64)
        u = _kernels.find(self.slots.data_ptr(), self.use.data_ptr(), self.slots.shape[0], self.key, ids.data_ptr(),
                          0 if f is None else f.data_ptr(), n, rows.data_ptr(), step or 0, touch, new.data_ptr(),
                          *self._scratch_for(n if touch else 0))
        return (rows, new[:, :u]) if touch else rows

    def _scratch_for(self, n: int) -> tuple[int, int]:
        """(address, mask) of a scratch table of >= 2n int64, all -1, kept between calls (the
        kernels leave it all -1)."""
        size = 1 << max(4, (2 * n).bit_length())
        if self._scratch.numel() < size:
            self._scratch = torch.full((size,), -1, dtype=torch.int64)
        return self._scratch.data_ptr(), size - 1

    def lookup(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows [N] of keys, -1 where missing (reads only)."""
        return self.find(ids, f)

    # ---- changes -----------------------------------------------------------------------
    def take_rows(self, n: int) -> torch.Tensor:
        """The n smallest free rows [n] (n <= num_free), no longer free."""
        top = self.num_free
        rows = self.free[top - n : top].flip(0).clone()
        self.num_free_ -= n
        return rows

    def place(self, ids: torch.Tensor, f: torch.Tensor, rows: torch.Tensor, last: torch.Tensor,
              count: torch.Tensor) -> None:
        """Put keys known to be absent [K] on ``rows`` [K] with their last step and count."""
        ids, f, rows, last, count = (_i64(x) for x in (ids, f, rows, last, count))
        if not ids.numel():
            return
        if self.native:
            _kernels.insert(self.slots.data_ptr(), self.use.data_ptr(), self.slots.shape[0], self.key, ids.data_ptr(),
                            f.data_ptr(), rows.data_ptr(), last.data_ptr(), count.data_ptr(), ids.numel(),
                            self.tombs_.data_ptr())
        else:
            at = _claim(self, ids, f)
            self.tombs_ -= (self.slots[at, 1] == DELETED).sum()
            self.slots[at] = torch.stack([ids, (f << 32) | rows], dim=1)
            self.use[at] = pack(count, last)

    def settle(self, rows: torch.Tensor, new: torch.Tensor, admitted: torch.Tensor, default_row: int, step: int,
               counters: torch.Tensor | None = None) -> torch.Tensor:
        """After :meth:`find` with ``step``: the admitted missing keys (``admitted`` [U] bool),
        in order, take free rows while there are any (last = step, count = occurrences);
        the others read ``default_row``.  Returns rows [N] with every missing id's row;
        ``counters`` [>= 2] gains the keys that took a row and those that did not."""
        u = new.shape[1]
        if not self.native:
            take = admitted.nonzero().squeeze(1)[: self.num_free]
            given = self.take_rows(take.numel())
            self.place(new[0, take], new[1, take], given, torch.full_like(given, step), new[2, take])
            newrow = torch.full((u,), default_row, dtype=torch.int64)
            newrow[take] = given
            if counters is not None:
                counters[:2] += torch.tensor([take.numel(), u - take.numel()])
            return torch.where(rows >= 0, rows, newrow[(-2 - rows).clamp(min=0)])
        _kernels.settle(self.slots.data_ptr(), self.use.data_ptr(), self.slots.shape[0], self.key, new.data_ptr(), u,
                        new.stride(0), admitted.data_ptr(), self.free.data_ptr(), self.num_free_.data_ptr(),
                        rows.data_ptr(), rows.numel(), default_row, step,
                        0 if counters is None else counters.data_ptr(), self.tombs_.data_ptr())
        return rows

    def insert(self, f: torch.Tensor, ids: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Give each key not yet in the map a free row, in order of first occurrence; rows [N]
        of all keys (-1 for keys left out when rows ran out)."""
        rows, new = self.find(ids, f, step=step)
        if not new.shape[1]:
            return rows
        return self.settle(rows, new, torch.ones(new.shape[1], dtype=torch.bool), -1, step)

    def live(self) -> torch.Tensor:
        """Slots [L] that hold a key."""
        return (self.slots[:, 1] >= 0).nonzero().squeeze(1)

    def rows_of(self, slots: torch.Tensor) -> torch.Tensor:
        return self.slots[slots, 1] & LOW32

    def last_of(self, slots: torch.Tensor) -> torch.Tensor:
        """The step that last read each key in ``slots`` [R]."""
        return self.use[slots] & LOW32

    def count_of(self, slots: torch.Tensor) -> torch.Tensor:
        """How often each key in ``slots`` [R] was read."""
        return self.use[slots] >> 32

    def remove(self, slots: torch.Tensor) -> torch.Tensor:
        """Forget the keys in ``slots`` [R]; their rows [R] (ascending) go back on the free
        stack, smallest on top.  Returns the rows."""
        rows = torch.from_numpy(np.sort(self.rows_of(slots).numpy()))  # torch.sort: 10x the time at 10^4
        self.slots[slots, 1] = DELETED
        self.use[slots] = -1
        self.tombs_ += rows.numel()
        n = self.num_free
        self.free[n : n + rows.numel()] = rows.flip(0)
        self.num_free_ += rows.numel()
        if int(self.tombs_) > self.slots.shape[0] // 4:  # long probe paths
            self._rebuild()
        return rows

    def remove_rows(self, rows: torch.Tensor) -> None:
        """Forget the keys on ``rows`` [R] (rows in use)."""
        live = self.live()
        hit = torch.isin(self.rows_of(live), rows)
        if int(hit.sum()) != torch.unique(rows).numel():
            raise ValueError("remove_rows: some rows hold no key")
        self.remove(live[hit])

    def _rebuild(self) -> None:
        """Every live key placed again in slots without tombstones (rows unchanged)."""
        live = self.live()
        keep, use = self.slots[live].clone(), self.use[live].clone()
        self.slots[:, 1] = EMPTY
        self.use.fill_(-1)
        self.tombs_.zero_()
        self.place(keep[:, 0], keep[:, 1] >> 32, keep[:, 1] & LOW32, use & LOW32, use >> 32)


# ---- the pure-torch path -------------------------------------------------------------------
def _probe(m: IdMap, ids: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
    """Slot [N] of each key, -1 if it is not in the map: all keys probe at once, one step a round."""
    n, C = ids.numel(), m.slots.shape[0]
    found = torch.full((n,), -1, dtype=torch.int64)
    pos = in_range(h63(ids, f, m.key), C)
    fk = torch.zeros(n, dtype=torch.int64) if f is None else f
    todo = torch.arange(n)
    while todo.numel():
        p = pos[todo]
        meta = m.slots[p, 1]
        hit = (meta >= 0) & (m.slots[p, 0] == ids[todo]) & ((meta >> 32) == fk[todo])
        found[todo[hit]] = p[hit]
        go_on = ~hit & (meta != EMPTY)  # an empty slot ends the probe path; tombstones do not
        todo = todo[go_on]
        pos[todo] = (p[go_on] + 1) % C
    return found


def _find_torch(m: IdMap, ids: torch.Tensor, f: torch.Tensor | None, step: int | None):
    found = _probe(m, ids, f)
    rows = torch.where(found >= 0, m.slots[found.clamp(min=0), 1] & LOW32, found)
    if step is None:
        return rows
    hit, times = found[found >= 0].unique(return_counts=True)
    m.use[hit] = pack((m.use[hit] >> 32) + times, torch.full_like(hit, step))
    miss = (found < 0).nonzero().squeeze(1)
    fk = torch.zeros(ids.numel(), dtype=torch.int64) if f is None else f
    first, where, cnt = _first_seen(fk[miss], ids[miss])
    rows[miss] = -2 - where
    return rows, torch.stack([ids[miss][first], fk[miss][first], cnt, torch.zeros_like(cnt)])


def pack(count: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """use [R] of keys read ``count`` [R] times, last at step ``last`` [R]."""
    return (count.clamp(max=COUNT_MAX) << 32) | last


def _i64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()


def _first_seen(f: torch.Tensor, ids: torch.Tensor):
    """(index of each distinct key's first occurrence, in that order [U]; each key's rank in
    that order [N]; occurrences of each distinct key [U])."""
    if not ids.numel():
        e = torch.zeros(0, dtype=torch.int64)
        return e, e, e
    uniq, inverse = torch.unique(torch.stack([f, ids], dim=1), dim=0, return_inverse=True)
    first = torch.full((len(uniq),), ids.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return first[order], rank[inverse], torch.bincount(rank[inverse], minlength=len(order))


def _claim(m: IdMap, ids: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """A distinct vacant slot on each absent key's probe path [K]."""
    k, C = ids.numel(), m.slots.shape[0]
    pos = in_range(h63(ids, f, m.key), C)
    slot = torch.full((k,), -1, dtype=torch.int64)
    taken = torch.zeros(C, dtype=torch.bool)
    todo = torch.arange(k)
    while todo.numel():
        p = pos[todo]
        vacant = (m.slots[p, 1] < 0) & ~taken[p]
        owner = torch.full((C,), k, dtype=torch.int64)  # the first key wanting a vacant slot wins it
        owner.scatter_reduce_(0, p[vacant], todo[vacant], reduce="amin")
        won = vacant & (owner[p] == todo)
        slot[todo[won]] = p[won]
        taken[p[won]] = True
        todo = todo[~won]
        pos[todo] = (p[~won] + 1) % C
    return slot
