"""One run of a graph collaborative-filtering model (NGCF, LightGCN: ``models/ngcf.py``) on
implicit-feedback data in the NGCF format (Gowalla), from a plain JSON-able spec.

Each epoch draws as many BPR triples as there are training interactions (``sampling``:
"user", a user uniformly and then one of their items, as the papers' code does, or
"interaction", each once), each with a freshly sampled negative (seeded by (seed, epoch),
so ``resume`` continues exactly); both learning rates follow an optional step schedule
(``lr_decay`` after each epoch of ``lr_decay_at``); and every ``eval_every`` epochs the
full-ranking Recall@k and NDCG@k on the test split (``rectables/ranking.py``) are logged
with the wall time.  The NGCF-format data have no validation split: nothing is selected
on the test split; the summary reports the last evaluation and the whole curve.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rectables.optim import SparseOptimizer

GRAPH_MODELS = ("ngcf", "lightgcn")
#: LightGCN's paper settings (dim 64, 3 layers, L2 1e-4) except the batch (8192 instead of
#: 2048: propagation costs the same per step whatever the batch, so bigger batches are
#: 4x cheaper per epoch on CPU) and the learning rate (Adam 0.01 instead of 0.001, for it)
GRAPH_SPEC = {"model": "lightgcn", "method": "full", "budget": 1.0, "dim": 64, "layers": 3, "epochs": 20,
              "batch_size": 8192, "sparse_optimizer": "adam", "sparse_lr": 0.01,
              "sparse_eps": SparseOptimizer.eps, "dense_lr": 0.001, "l2": 1e-4,
              "message_dropout": None, "node_dropout": 0.0, "sampling": "user", "lr_decay": 1.0, "lr_decay_at": [],
              "seed": 0, "eval_every": 1, "k": 20, "progress": True}
#: NGCF's message dropout where the spec gives none (its paper: 0.1); LightGCN has none
MESSAGE_DROPOUT = {"ngcf": 0.1, "lightgcn": 0.0}


def build_graph_model(spec: dict, train, num_users: int, num_items: int):
    from data.gowalla import normalized_adjacency
    from models.ngcf import GraphCF
    from rectables.embedding_modules import EmbeddingCollection
    from rectables.optim import SparseOptimizer
    from rectables.registry import table_class
    from rectables.sizing import tables_for_budget

    opt = SparseOptimizer(spec["sparse_optimizer"], lr=spec["sparse_lr"], eps=spec["sparse_eps"])
    from rectables.experiment import check_budget

    cls = table_class(spec["method"])
    check_budget(spec)
    tables = tables_for_budget(cls, spec["dim"], ["user", "item"], [num_users, num_items], spec["budget"], opt)
    return GraphCF(EmbeddingCollection(tables, opt), num_users, num_items,
                   normalized_adjacency(train, num_users, num_items), layers=spec["layers"], kind=spec["model"],
                   message_dropout=spec["message_dropout"], node_dropout=spec["node_dropout"], l2=spec["l2"])


def resolve_spec(spec: dict) -> dict:
    """The spec with defaults filled in; unknown entries are an error naming them."""
    unknown = set(spec) - set(GRAPH_SPEC) - {"data"}
    if unknown:
        raise ValueError(f"unknown entries for a graph model {sorted(unknown)}; known: {sorted(GRAPH_SPEC)}")
    out = {**GRAPH_SPEC, **{k: v for k, v in spec.items() if v is not None}}
    if out["model"] not in GRAPH_MODELS:
        raise ValueError(f"model must be one of {GRAPH_MODELS}, got {out['model']!r}")
    from models.ngcf import SAMPLINGS

    if out["sampling"] not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {out['sampling']!r}")
    if out["message_dropout"] is None:
        out["message_dropout"] = MESSAGE_DROPOUT[out["model"]]
    decay, at = out["lr_decay"], out["lr_decay_at"]
    if not (isinstance(decay, (int, float)) and 0 < decay <= 1 and isinstance(at, (list, tuple))
            and all(isinstance(e, int) and e >= 1 for e in at) and list(at) == sorted(set(at))):
        raise ValueError(f"lr_decay must lie in (0, 1] and lr_decay_at be increasing epochs >= 1, got {decay}, {at}")
    if (decay == 1) != (len(at) == 0):
        raise ValueError("lr_decay and lr_decay_at go together: a factor < 1 and the epochs after which it applies")
    out["lr_decay_at"] = list(at)
    if out["epochs"] < 1 or out["batch_size"] < 1 or out["eval_every"] < 1 or out["k"] < 1:
        raise ValueError("epochs, batch_size, eval_every and k must be >= 1")
    from data.sources import resolve

    out["data"] = str(resolve(spec["data"]).absolute())
    return out


def set_rates(model, spec: dict, dense_opt, dense_lrs: list[float], done: int) -> float:
    """Both optimizers' rates for the epoch after ``done`` epochs: the spec's rates times
    lr_decay for every epoch of lr_decay_at that has passed (a step schedule); returns the factor."""
    from rectables.memory import _collections

    scale = spec["lr_decay"] ** sum(e <= done for e in spec["lr_decay_at"])
    for c in _collections(model):
        for st in c.storages.values():
            st.set_learning_rate(spec["sparse_lr"] * scale)
    for g, lr in zip(dense_opt.param_groups if dense_opt else [], dense_lrs):
        g["lr"] = lr * scale
    return scale


def run_graph(spec: dict, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``spec`` into ``run_dir`` (config.json, metrics.jsonl, memory.json, last.pt,
    summary.json, written atomically); ``resume`` continues exactly from last.pt."""
    from data.gowalla import load_interactions
    from models.ngcf import bpr_triples
    from rectables.memory import dense_param_groups, memory_report
    from rectables.ranking import recall_ndcg
    from rectables.train import _CHECK_EVERY as CHECK_EVERY
    from rectables.train import _check_finite as check_finite
    from rectables.train import tables_extra_loss, tables_step_end
    from rectables.runs import (load_checkpoint, save_checkpoint, start_run, table_settings, versions, write_json,
                                write_jsonl)

    spec = resolve_spec(spec)
    train, test, U, I = load_interactions(spec["data"])
    run = Path(run_dir)
    config = {**spec, "train": {"epochs": spec["epochs"], "progress": spec["progress"]},
              "dataset": {"users": U, "items": I, "train": len(train.items), "test": len(test.items)},
              "versions": versions()}
    config = {k: v for k, v in config.items() if k not in ("epochs", "progress")}
    resume = start_run(run, config, resume, overwrite)
    torch.manual_seed(spec["seed"])
    model = build_graph_model(spec, train, U, I)
    params = dense_param_groups(model, spec["dense_lr"])
    dense_lrs = [g["lr"] for g in params]  # the optimizer keeps these dicts as its groups
    dense_opt = torch.optim.Adam(params, lr=spec["dense_lr"]) if params else None
    state = {"epoch": 0, "step": 0, "history": []}
    if resume:
        state = load_checkpoint(run / "last.pt", model, dense_opt)
    else:
        write_json(run / "memory.json", memory_report(model, dense_opt))
    write_jsonl(run / "metrics.jsonl", state["history"])
    B, label = spec["batch_size"], f"{spec['model']} {spec['method']}"
    while state["epoch"] < spec["epochs"]:
        set_rates(model, spec, dense_opt, dense_lrs, state["epoch"])
        model.train()
        torch.manual_seed(spec["seed"] * 100_003 + state["epoch"])  # dropout masks, per epoch
        users, pos, neg = bpr_triples(train, I, np.random.default_rng([spec["seed"], state["epoch"]]), spec["sampling"])
        t0, losses = time.perf_counter(), []
        bar = tqdm(range(0, len(users), B), desc=f"{label} epoch {state['epoch'] + 1}/{spec['epochs']}",
                   disable=not spec["progress"], leave=False)
        for s in bar:
            loss = model.loss(*(torch.from_numpy(a[s : s + B]) for a in (users, pos, neg))) + tables_extra_loss(model)
            if dense_opt:
                dense_opt.zero_grad()
            loss.backward()
            if dense_opt:
                dense_opt.step()
            losses.append(loss.detach())
            state["step"] += 1
            tables_step_end(model, state["step"])
            if state["step"] % CHECK_EVERY == 0:  # one host sync per CHECK_EVERY steps, as in the CTR loop
                check_finite(losses[-CHECK_EVERY:], state["step"])
        check_finite(losses[-(len(losses) % CHECK_EVERY or CHECK_EVERY):], state["step"])  # before anything is saved
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "step": state["step"], "loss": float(torch.stack(losses).mean()),
                  "train_s": time.perf_counter() - t0}
        if state["epoch"] % spec["eval_every"] == 0 or state["epoch"] == spec["epochs"]:
            model.eval()
            t1 = time.perf_counter()
            r = recall_ndcg(*model.embeddings(), train, test, k=spec["k"])
            record.update({f"recall@{spec['k']}": r["recall"], f"ndcg@{spec['k']}": r["ndcg"],
                           "eval_s": time.perf_counter() - t1})
            if spec["progress"]:
                tqdm.write(f"{label} epoch {state['epoch']}: loss {record['loss']:.4f}, recall@{spec['k']} "
                           f"{r['recall']:.4f}, ndcg@{spec['k']} {r['ndcg']:.4f}, {record['train_s']:.0f} s")
        state["history"].append(record)
        write_jsonl(run / "metrics.jsonl", state["history"])
        save_checkpoint(run / "last.pt", model, dense_opt, state)
    last = [h for h in state["history"] if f"recall@{spec['k']}" in h][-1]
    summary = {"config": {k: v for k, v in spec.items() if k != "progress"}, "last": last,
               "settings": table_settings(model), "interactions": len(train.items),
               "history": state["history"], "memory": memory_report(model, dense_opt),
               "seconds_per_epoch": float(np.median([h["train_s"] for h in state["history"]]))}
    write_json(run / "summary.json", summary)
    return summary

