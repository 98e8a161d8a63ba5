"""Byte accounting from real tensors (works on ``device="meta"``: bytes come from shapes).

``memory_report(model, optimizer)`` gives, for every table of every rectables collection
in ``model``: weight bytes, optimizer-state bytes and buffer bytes (seeds, salts, maps,
and a table's own small parameters such as thresholds);
the fused storage's own bookkeeping; the dense rest of the model and the torch
optimizer's state.  ``total`` equals the bytes of every tensor the model and optimizer
hold, counted once.
"""
from __future__ import annotations

import torch
from torch import nn


def _collections(model: nn.Module) -> list[nn.Module]:
    from rectables.collection import _Collection

    return [m for m in model.modules() if isinstance(m, _Collection)]


def _tensor_bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters a torch optimizer should own: everything outside fused storages."""
    fused = {id(p) for c in _collections(model) for p in c.row_parameters()}
    return [p for p in model.parameters() if id(p) not in fused]


def dense_param_groups(model: nn.Module, lr: float) -> list[dict]:
    """``dense_parameters(model)`` as torch optimizer groups: one at ``lr``, and one per
    table parameter with a rate of its own (``Table.param_lrs``, e.g. OptEmbed's thresholds)."""
    own = {id(p): rate for c in _collections(model) for t in c.tables
           for name, rate in t.param_lrs.items() for p in [t.get_parameter(name)]}
    params = dense_parameters(model)
    groups = [{"params": [p for p in params if id(p) not in own], "lr": lr}]
    for rate in dict.fromkeys(own[id(p)] for p in params if id(p) in own):  # one group per rate
        groups.append({"params": [p for p in params if own.get(id(p)) == rate], "lr": rate})
    return [g for g in groups if g["params"]]


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes held by ``model`` (and ``optimizer``), per table and in total."""
    tables: dict[str, dict] = {}
    overhead = 0
    in_collections: set[int] = set()
    for c in _collections(model):
        accounted = 0
        for i, t in enumerate(c.tables):
            st, base = c.table_storage(i)
            ks = range(base, base + len(t.physical_shapes()))
            entry = {
                "method": t.method,
                "rows": sum(st.shapes[k][0] for k in ks),
                "weights": sum(st.weight_bytes(k) for k in ks),
                "optimizer": sum(s.nbytes for k in ks for s in st.optimizer_state(k).values()),
                "buffers": _tensor_bytes(list(t.buffers()) + list(t.parameters())),  # with thresholds
            }
            entry["total"] = entry["weights"] + entry["optimizer"] + entry["buffers"]
            tables[t.name] = entry
            accounted += entry["weights"] + entry["optimizer"]
        overhead += _tensor_bytes(_distinct(t for st in c.storages.values() for t in st.tensors())) - accounted
        in_collections |= {id(x) for x in list(c.parameters()) + list(c.buffers())}
    dense_params = [p for p in model.parameters() if id(p) not in in_collections]
    dense_bufs = [b for b in model.buffers() if id(b) not in in_collections]
    opt_bytes = 0
    if optimizer is not None:
        opt_bytes = _tensor_bytes(
            v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
    dense = {
        "parameters": _tensor_bytes(dense_params),
        "buffers": _tensor_bytes(dense_bufs),
        "optimizer": opt_bytes,
    }
    total = sum(e["total"] for e in tables.values()) + overhead + sum(dense.values())
    return {"tables": tables, "storage_overhead": overhead, "dense": dense, "total": total}


def _distinct(tensors) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def real_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of every distinct tensor of ``model`` and ``optimizer`` (the ground truth):
    the storages' own tensors, not the row views a collection shows as parameters."""
    views = {id(p) for c in _collections(model) for p in c.row_parameters()}
    seen: dict[int, torch.Tensor] = {}
    for x in list(model.parameters()) + list(model.buffers()) + [
            t for c in _collections(model) for st in c.storages.values() for t in st.tensors()]:
        if id(x) not in views:
            seen[id(x)] = x
    if optimizer is not None:
        for s in optimizer.state.values():
            for v in s.values():
                if isinstance(v, torch.Tensor):
                    seen[id(v)] = v
    return _tensor_bytes(seen.values())
