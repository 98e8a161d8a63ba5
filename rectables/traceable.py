"""The lookup as straight-line tensor code, for torch.fx (torchrec's tracer) and
TorchScript: inference on the same rows as the fused path.

Every method's remap runs behind one custom op, ``torch.ops.rectables.remap(ids [N],
handle) -> rows [K_f, N]``: ``handle`` names a (table, feature) registered in this
process, so a traced or scripted graph calls the method's own remap and never a copy of
it.  Rows are then read with ``embedding_bag`` (pooled) or ``embedding`` (per id) from
the row views the collection shows as parameters, and combined as in the fused path.
A scripted module runs in the process that built it (its handles live here).

Shapes: B batch, N ids of a feature, K_f lanes of feature f, D dim.
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F

_NEXT = itertools.count(1)


class Handles:
    """Int handles for (object, key) pairs, so that a traced or compiled graph passes a
    constant instead of an object; the object is held weakly."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._of: dict[int, tuple[weakref.ref, object]] = {}
        self._by: dict[tuple[int, object], int] = {}

    def handle(self, obj, key) -> int:
        h = self._by.get((id(obj), key))
        if h is None or self._of[h][0]() is not obj:  # new, or an id reused by a new object
            h = next(_NEXT)
            self._by[(id(obj), key)], self._of[h] = h, (weakref.ref(obj), key)
        return h

    def get(self, h: int) -> tuple:
        ref, key = self._of[h]
        obj = ref()
        if obj is None:
            raise RuntimeError(f"handle {h}: its {self.what} no longer exists")
        return obj, key


TABLES = Handles("table")  # (table, feature index)


@torch.library.custom_op("rectables::remap", mutates_args=())
def remap(values: torch.Tensor, handle: int) -> torch.Tensor:
    """Rows [K_f, N] of ids [N] of the feature behind ``handle``."""
    table, f = TABLES.get(handle)
    counts = [0] * len(table.feature_names)
    counts[f] = values.numel()
    return table.remap(values.long(), counts)[f].contiguous().clone()


@remap.register_fake
def _(values: torch.Tensor, handle: int) -> torch.Tensor:
    table, f = TABLES.get(handle)
    return values.new_empty((len(table.feature_lanes(f)), values.shape[0]), dtype=torch.int64)


def lookup(collection, features) -> list:
    """(output [B, D_f] pooled or [N_f, D] per id, its JaggedTensor) per output feature of
    ``collection``, in traceable code (no fused update)."""
    d = features.to_dict()
    rows = getattr(collection, collection._rows_name)
    outs = []
    for t in collection.tables:
        lane_weights = [rows[t.name].weight] if len(t.physical_shapes()) == 1 else \
            [getattr(rows[t.name], f"weight_{k}") for k in range(len(t.physical_shapes()))]
        for f, name in enumerate(t.feature_names):
            jt = d[name]
            lanes = torch.ops.rectables.remap(jt.values(), TABLES.handle(t, f))
            tables = [lane_weights[k] for k in t.feature_lanes(f)]
            if collection.pooled:
                outs.append((_pooled(t, f, tables, lanes, jt, collection.is_weighted()), jt))
            else:
                vecs = _per_id(t.combine, tables, lanes)
                B = jt.lengths().numel()
                outs.append((t.transform(f, vecs, _bags(jt.lengths()), B) if t.transforms else vecs, jt))
    return outs


def _per_id(combine: str, tables: list, lanes: torch.Tensor) -> torch.Tensor:
    """[N, D]: each id's lanes read and combined."""
    vecs = [F.embedding(lanes[k], w, norm_type=2.0) for k, w in enumerate(tables)]  # a float: TorchScript
    if combine == "concat":
        return torch.cat(vecs, dim=1)
    out = vecs[0]
    for v in vecs[1:]:
        out = out + v if combine == "sum" else out * v
    return out


def _bags(lengths: torch.Tensor) -> torch.Tensor:
    """The bag [N] of each id of bags of ``lengths`` [B]."""
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


def _pooled(t, f: int, tables: list, lanes: torch.Tensor, jt, weighted: bool) -> torch.Tensor:
    """[B, D]: bags of feature ``jt`` (the table's f-th) pooled as the fused path does."""
    w = jt.weights() if weighted else None
    offsets = jt.offsets()
    lengths = jt.lengths()
    if t.combine == "mult" or t.transforms:  # per id (product, transform), then (weighted) sums per bag
        vecs = _per_id(t.combine, tables, lanes)
        bag = _bags(lengths)
        if t.transforms:
            vecs = t.transform(f, vecs, bag, lengths.numel())
        if w is not None:
            vecs = vecs * w.unsqueeze(1)
        out = vecs.new_zeros([lengths.numel(), vecs.shape[1]]).index_add(0, bag, vecs)
    else:
        bags = [F.embedding_bag(lanes[k], tw, offsets, mode="sum", per_sample_weights=w, include_last_offset=True,
                                norm_type=2.0)
                for k, tw in enumerate(tables)]
        out = torch.cat(bags, dim=1) if t.combine == "concat" else torch.stack(bags).sum(0)
    out = out.float()
    if t.pooling == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(1).float()
    return out
