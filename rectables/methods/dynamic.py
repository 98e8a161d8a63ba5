"""``dynamic``: a collisionless table that grows as ids arrive, with admission and eviction.

Monolith (Liu et al., "Monolith: Real Time Recommendation System With Collisionless
Embedding Table", ORSUM@RecSys 2022): every admitted raw id gets a row of its own;
rare ids are kept out by an occurrence threshold counted in a count-min sketch
(Cormode & Muthukrishnan, "An Improved Data Stream Summary: The Count-Min Sketch and
its Applications", J. Algorithms 2005) or by a coin flip; stale ids expire.

Physical table: [M + 1, D]; rows 0..M-1 belong to admitted keys (feature, id), given in
order of first occurrence (:class:`rectables.idmap.IdMap`); row M is the **default
row**, shared by every id without a row of its own (not yet admitted, rejected, or
arriving when the table is full), and trained like any other row.  The same id in two
features is two keys.

A training-mode lookup is one step (``step`` counts them).  In it:

1. every key with a row is read, and its ``last`` step and ``count`` updated;
2. every distinct missing key is offered for admission: with ``min_count > 1`` its
   occurrences in this batch are added to a count-min sketch (``sketch_depth`` rows of
   ``sketch_width`` int32 counters) and it is admitted once the estimate reaches
   ``min_count``; with ``admit_prob < 1`` it is then admitted with that probability
   (a seeded hash of the key and step, so runs repeat);
3. if more keys are admitted than rows are free, rows are evicted first
   (``eviction``): ``"lru"`` least recently read, ``"lfu"`` least often read (ties:
   least recent), never a row read in this step; at least ``evict_chunk`` of M at a
   time (fewer selections over the whole table).  ``"ttl"`` evicts nothing when full;
   ``None`` neither.  Keys that still find no row read the default row;
4. every ``evict_every`` steps (and when full) rows not read for more than ``ttl``
   steps expire, whatever ``eviction`` is.

An evicted or expired row is re-initialised and its optimizer state zeroed
(:meth:`Table.reset_rows`) before any id reads it.  Evaluation mode only reads: it
inserts, evicts and counts nothing; missing keys read the default row.

Sketch error: the estimate never undercounts; it overcounts by more than e / width
times the occurrences counted so far with probability at most exp(-depth).  Only
occurrences of missing keys are counted.

Bytes beyond the weights (``memory_report`` counts them as the table's buffers): the
map's 24 bytes per slot at load <= 0.7 (~35 B a row), the free stack (8 B a row) and
the sketch (4 B a counter).  A table counts at most 2^32 - 2 training steps.
Shapes: N ids, U distinct missing keys, M rows, D dim.
"""
from __future__ import annotations

import itertools
import math

import torch

from rectables import hashing
from rectables.idmap import MAX_STEP, IdMap, _i64, _kernels, h63, huge_pages, in_range, num_slots
from rectables.presets import MIN_ROWS
from rectables.registry import register
from rectables.table import Table

EVICTIONS = ("lru", "lfu", "ttl", None)
_STATS = ("admitted", "rejected", "evicted", "expired")


@register
class DynamicTable(Table):
    """Collisionless rows for up to ``max_rows`` admitted ids (+ one default row)."""

    method = "dynamic"
    size_arg = "max_rows"

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        max_rows: int,
        min_count: int = 1,
        admit_prob: float = 1.0,
        eviction: str | None = "lfu",
        ttl: int | None = None,
        evict_every: int = 1,
        evict_chunk: float = 0.01,
        sketch_width: int | None = None,
        sketch_depth: int = 4,
        seed: int = 0,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        bad = []
        if not 1 <= max_rows < 1 << 31:
            bad.append(f"max_rows must lie in [1, 2^31), got {max_rows}")
        if min_count < 0:
            bad.append(f"min_count must be >= 0, got {min_count}")
        if not 0 < admit_prob <= 1:
            bad.append(f"admit_prob must lie in (0, 1], got {admit_prob}")
        if eviction not in EVICTIONS:
            bad.append(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        if (eviction == "ttl" and ttl is None) or (ttl is not None and ttl < 1):
            bad.append(f"ttl must be an int >= 1 (steps){' with eviction=ttl' if eviction == 'ttl' else ''}, got {ttl}")
        if evict_every < 1 or not 0 <= evict_chunk <= 1:
            bad.append(f"evict_every must be >= 1 and evict_chunk in [0, 1]; got {evict_every}, {evict_chunk}")
        if min_count <= 1 and sketch_width is not None:
            bad.append("sketch_width is used only with min_count > 1")
        if sketch_depth < 1 or (sketch_width is not None and sketch_width < 1):
            bad.append(f"sketch_depth and sketch_width must be >= 1, got {sketch_depth}, {sketch_width}")
        if bad:
            raise ValueError(f"table {name!r}: " + "; ".join(bad))
        self.max_rows = int(max_rows)
        self.min_count, self.admit_prob = int(min_count), float(admit_prob)
        self.eviction, self.ttl, self.evict_every, self.evict_chunk = eviction, ttl, int(evict_every), evict_chunk
        self.map = IdMap(self.max_rows, seed)
        depth, width = (sketch_depth, sketch_width or default_width(self.max_rows)) if min_count > 1 else (0, 0)
        sketch = torch.empty(depth, width, dtype=torch.int32)
        huge_pages(sketch)
        self.register_buffer("sketch", sketch.zero_())
        self.register_buffer("sketch_keys", torch.tensor([hashing.salt_key(seed, 2, j) for j in range(depth)],
                                                         dtype=torch.int64))
        self._prob_key = hashing.salt_key(seed, 3)
        self._threshold = round(self.admit_prob * (1 << 24))
        self._reset_seed = hashing.salt_key(seed, 4) & ((1 << 62) - 1)
        self._admitted = torch.empty(0, dtype=torch.bool)  # scratch of the C path: admitted [N]
        self._new = torch.empty(0, dtype=torch.int64)  # and new keys [4, N]
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("counters", torch.zeros(len(_STATS), dtype=torch.int64))

    def physical_shapes(self) -> list[tuple[int, int]]:
        return [(self.max_rows + 1, self.embedding_dim)]

    @property
    def default_row(self) -> int:
        return self.max_rows

    # ---- sizing ------------------------------------------------------------------------
    @staticmethod
    def table_bytes(max_rows: int, embedding_dim: int, min_count: int = 1, sketch_depth: int = 4) -> int:
        """Bytes of weights, map, free stack and sketch of a table of ``max_rows`` rows."""
        sketch = (4 * default_width(max_rows) + 8) * sketch_depth if min_count > 1 else 0  # counters, keys
        small = 8 * (len(_STATS) + 3)  # counters, step, free-stack height, deleted slots
        return 4 * embedding_dim * (max_rows + 1) + 24 * num_slots(max_rows) + 8 * max_rows + sketch + small

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        """The most rows such that weights + map + sketch <= ``fraction`` of ``full``'s
        weights (at most ``num_ids``; at least ``MIN_ROWS`` or ``num_ids`` if fewer, as
        every method); LFU eviction; ``min_count=2`` when rows < ids (no sketch otherwise).
        ``for_budget_all`` builds one table per feature, so each feature has its own
        default row (one table shared by all features, measured on the demo data, lost
        0.011 AUC at 1/4 and at 1/16: the tail ids of all 26 features shared one row)."""
        budget = fraction * 4 * embedding_dim * num_ids
        lo, hi = 1, max(1, num_ids)
        while lo < hi:  # the most rows that fit
            mid = (lo + hi + 1) // 2
            fits = cls.table_bytes(mid, embedding_dim, 1 if mid >= num_ids else 2) <= budget
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        rows = max(lo, min(num_ids, MIN_ROWS))
        return cls(name, embedding_dim, feature_names, rows, min_count=1 if rows >= num_ids else 2, seed=seed)

    # ---- the remap ---------------------------------------------------------------------
    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        return self.remap_many([self], [values], [counts])[0]

    @classmethod
    def remap_many(cls, tables, values, counts):
        """Training lookups of all native tables in one C call, the tables spread over
        ``torch.get_num_threads()`` threads (they share no state, so the rows are those of
        one table at a time); then, table by table, evictions where rows ran short."""
        jobs, out = [], [None] * len(tables)
        for i, (t, v, c) in enumerate(zip(tables, values, counts)):
            f = None
            if len(c) > 1:
                f = torch.repeat_interleave(torch.arange(len(c)), torch.tensor(c), output_size=v.numel())
            if not t.training:
                rows = t.map.find(v, f)
                out[i] = t.per_feature(torch.where(rows >= 0, rows, t.default_row)[None], c)
                continue
            step = int(t._buffers["step"]) + 1
            if step > MAX_STEP:
                raise RuntimeError(f"table {t.name!r}: a dynamic table counts at most {MAX_STEP} training steps")
            if t.ttl is not None and step % t.evict_every == 0:
                t._expire(step)
            if t._modules["map"].native:
                jobs.append((i, _i64(v), None if f is None else _i64(f), step))
            else:
                out[i] = t._train_torch(v, f, step, c)
        if not jobs:
            return out
        # one buffer for the rows of all tables [sum N]
        sizes = [v.numel() for _, v, _, _ in jobs]
        rows_all = torch.empty(sum(sizes), dtype=torch.int64)
        starts = list(itertools.accumulate(sizes, initial=0))  # table j at [starts[j], starts[j] + sizes[j])
        args = [tables[i]._args(v, f, n, step, rows_all.data_ptr() + 8 * at)
                for (i, v, f, step), n, at in zip(jobs, sizes, starts)]
        order = sorted(range(len(jobs)), key=lambda j: -args[j][2])  # the largest maps (C) first: threads end together
        res = _kernels.train([args[j] for j in order], max(1, min(torch.get_num_threads(), len(jobs))))
        rows = rows_all[None].split(sizes, dim=1)  # [1, N] per table
        for j, (u, admitted, settled) in zip(order, res):
            i, _, _, step = jobs[j]
            t = tables[i]
            if u and not settled:  # more keys admitted than rows free: make room first
                n = sizes[j]
                t._make_room(admitted, step)
                t.map.settle(rows[j][0], t._new[: 4 * n].view(4, n)[:, :u], t._admitted[:u], t.default_row, step,
                             t.counters)
            out[i] = t.per_feature(rows[j], counts[i])
        return out

    def _train_torch(self, values, f, step, counts):
        m = self.map
        self.step.fill_(step)
        rows, new = m.find(values, f, step=step)
        admit = _admit_torch(self, new[0], new[1], new[2], self._prob_key_at(step))
        if new.shape[1]:
            n = int(admit.sum())
            if n > m.num_free:
                self._make_room(n, step)
            rows = m.settle(rows, new, admit, self.default_row, step, self.counters)
        return self.per_feature(rows[None], counts)

    def _args(self, values: torch.Tensor, f: torch.Tensor | None, n: int, step: int, rows: int) -> tuple:
        """The C kernel's arguments for one training lookup of ids ``values`` [N] (int64,
        contiguous) into the rows at address ``rows``, its new keys [4, N] into the table's
        own scratch (``_new``, kept between calls: a fresh one faulted in its pages every
        batch): step count, find, admission and, if rows are enough, settle.  Addresses are
        read anew each call (a copied table has buffers of its own); buffers come from
        ``_buffers`` directly (module attribute lookups were a third of a small table's time)."""
        if self._admitted.numel() < n:
            self._admitted = torch.empty(n, dtype=torch.bool)
            self._new = torch.empty(4 * n, dtype=torch.int64)
        m = self._modules["map"]
        b, mb = self._buffers, m._buffers
        slots, sketch = mb["slots"], b["sketch"]
        return (slots.data_ptr(), mb["use"].data_ptr(), slots.shape[0], m.key, values.data_ptr(),
                0 if f is None else f.data_ptr(), n, rows, b["step"].data_ptr(), self._new.data_ptr(),
                *m._scratch_for(n), sketch.data_ptr(), sketch.shape[0], sketch.shape[1], b["sketch_keys"].data_ptr(),
                self.min_count, self._threshold, self._prob_key_at(step), self._admitted.data_ptr(),
                mb["free"].data_ptr(), mb["num_free_"].data_ptr(), b["counters"].data_ptr(), self.max_rows,
                mb["tombs_"].data_ptr())

    def _prob_key_at(self, step: int) -> int:
        return hashing._signed(self._prob_key ^ (step * hashing.GOLDEN))

    # ---- eviction ----------------------------------------------------------------------
    def _make_room(self, admitted: int, step: int) -> None:
        """Free rows for ``admitted`` keys: expire stale rows, then evict by policy."""
        m = self.map
        if self.ttl is not None:
            self._expire(step)
        short = admitted - m.num_free
        if short <= 0 or self.eviction not in ("lru", "lfu"):
            return
        k = max(short, math.ceil(self.evict_chunk * self.max_rows))
        if m.native:
            out = torch.empty(k, dtype=torch.int64)
            n = _kernels.select(m.slots.data_ptr(), m.use.data_ptr(), m.slots.shape[0], step, self.eviction == "lfu", k,
                                out.data_ptr(), torch.get_num_threads())
            self._drop(out[:n], 2, step)
            return
        live = m.live()
        live = live[m.last_of(live) < step]  # never a row this step reads
        # (last, row), or (count, last, row): use packs (count, last) in that order
        keys = [m.use[live] if self.eviction == "lfu" else m.last_of(live), m.rows_of(live)]
        self._drop(live[smallest(keys, min(live.numel(), k))], 2, step)

    def _expire(self, step: int) -> None:
        live = self.map.live()
        self._drop(live[step - self.map.last_of(live) > self.ttl], 3, step)

    def _drop(self, slots: torch.Tensor, counter: int, step: int) -> None:
        if slots.numel():
            rows = self.map.remove(slots)
            self.reset_rows(0, rows, seed=self._reset_seed + 2 * step + counter % 2)  # a resume draws alike
            self.counters[counter] += rows.numel()

    # ---- reporting ---------------------------------------------------------------------
    def sketch_estimate(self, ids: torch.Tensor, feature: int = 0) -> torch.Tensor:
        """The sketch's occurrence estimate [N] for ids [N] of the table's ``feature``-th
        feature (reads only; counts occurrences seen while the key had no row)."""
        depth, width = self.sketch.shape
        if not depth:
            raise ValueError(f"table {self.name!r} keeps no sketch (min_count <= 1)")
        f = torch.full_like(ids, feature)
        return torch.stack([self.sketch[d][in_range(h63(ids, f, self.sketch_keys[d]), width)]
                            for d in range(depth)]).min(0).values

    def stats(self) -> dict:
        """Occupancy and the counts since the table was built (collisions: rows held by more
        than one key, checked over the whole map; always 0)."""
        live = self.map.live()
        rows = self.map.rows_of(live)
        return {
            "rows": self.max_rows, "occupied": self.map.size, "occupancy": self.map.size / self.max_rows,
            "steps": int(self.step), **{k: int(v) for k, v in zip(_STATS, self.counters)},
            "collisions": int(live.numel() - torch.unique(rows).numel()),
        }

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, min_count={self.min_count}, admit_prob={self.admit_prob}, "
                f"eviction={self.eviction!r}, ttl={self.ttl}")


def default_width(max_rows: int) -> int:
    """Sketch counters per row of the sketch: a quarter of the rows (at least 256)."""
    return max(256, max_rows // 4)


def smallest(keys: list[torch.Tensor], k: int) -> torch.Tensor:
    """Indices of the k smallest entries ordered by ``keys`` (lexicographic, the last key
    unique), in no particular order: one kthvalue per key, O(L) each."""
    idx = torch.arange(keys[0].numel())
    chosen = []
    for key in keys:
        if k <= 0 or k >= idx.numel():
            break
        p = key[idx]
        v = p.kthvalue(k).values
        below = idx[p < v]
        chosen.append(below)
        k -= below.numel()
        idx = idx[p == v]
    if k > 0:
        chosen.append(idx[:k])
    return torch.cat(chosen) if chosen else idx[:0]


def _admit_torch(t: DynamicTable, ids, f, cnt, prob_key) -> torch.Tensor:
    """Which of the U missing keys may take a row [U] (the pure-torch path of the C admit)."""
    ok = torch.ones(ids.numel(), dtype=torch.bool)
    depth, width = t.sketch.shape
    if t.min_count > 1:
        idx = torch.stack([in_range(h63(ids, f, t.sketch_keys[d]), width) + d * width for d in range(depth)])
        flat = t.sketch.view(-1)
        flat.index_add_(0, idx.reshape(-1), cnt.to(torch.int32).repeat(depth))
        flat[idx.reshape(-1)] = flat[idx.reshape(-1)].clamp(max=1 << 30)
        ok = flat[idx].min(0).values >= t.min_count
    if t._threshold < 1 << 24:
        ok &= (h63(ids, f, prob_key) >> 39) < t._threshold
    return ok
