"""One run of DIN or its base model (``models/din.py``) on behaviour sequences
(``data/sequences.py``: MovieLens-100k, Amazon Beauty), from a plain JSON-able spec, with
the CTR training loop (``rectables/train.py``): validation AUC picks the epoch, the test
split is scored once with AUC and GAUC."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

SEQUENCE_MODELS = ("din", "din-base")
SEQUENCE_SPEC = {"model": "din", "method": "full", "budget": 1.0, "dim": 16, "attention": [80, 40],
                 "hidden": [200, 80], "activation": "dice", "softmax": False, "max_history": 50, "data_seed": 0}


def _load(data: str):
    from data.sequences import LOADERS
    from data.sources import resolve

    path = resolve(data)
    kind = data if data in LOADERS else ("movielens" if (path / "u.data").exists() else
                                         "beauty" if (path / "beauty.txt.gz").exists() else None)
    if kind is None:
        raise ValueError(f"{data}: neither MovieLens-100k (u.data, u.item) nor Amazon Beauty (beauty.txt.gz)")
    return kind, path, LOADERS[kind](path)


def build_din(spec: dict, seq, opt):
    from models.din import DIN
    from rectables.embedding_modules import EmbeddingCollection
    from rectables.registry import table_class
    from rectables.sizing import tables_for_budget

    from rectables.experiment import check_budget

    check_budget(spec)
    features, cards = ["item"], [seq.num_items]
    if seq.categories is not None:
        features, cards = ["item", "cat"], [seq.num_items, seq.num_categories]
    tables = tables_for_budget(table_class(spec["method"]), spec["dim"], features, cards, spec["budget"], opt)
    return DIN(EmbeddingCollection(tables, opt), tuple(spec["attention"]), tuple(spec["hidden"]), spec["activation"],
               spec["softmax"], "sum" if spec["model"] == "din-base" else "attention")


def run_din(spec: dict, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    from data.sequences import SequenceBatches, make_splits
    from rectables.experiment import auto_batch_size, load_best
    from rectables.optim import SparseOptimizer
    from rectables.runs import start_run, table_settings, versions, write_json
    from rectables.train import TrainConfig, evaluate, fit

    unknown = set(spec) - set(SEQUENCE_SPEC) - {"data", "train"}
    if unknown:
        raise ValueError(f"unknown entries for a sequence model {sorted(unknown)}; known: {sorted(SEQUENCE_SPEC)}")
    spec = {**SEQUENCE_SPEC, **{k: v for k, v in spec.items() if v is not None}}
    if spec["model"] not in SEQUENCE_MODELS:
        raise ValueError(f"model must be one of {SEQUENCE_MODELS}, got {spec['model']!r}")
    kind, path, seq = _load(spec["data"])
    spec["data"] = str(path.absolute())
    splits = make_splits(seq, spec["data_seed"], spec["max_history"])
    train_spec = {"sparse_lr": 0.05, **spec.get("train", {})}
    if train_spec.get("batch_size", "auto") == "auto":
        train_spec["batch_size"] = auto_batch_size(len(splits["train"].label))
    cfg = TrainConfig(**train_spec)
    config = {**spec, "train": asdict(cfg), "dataset": {"kind": kind, "users": len(seq.offsets) - 1,
              "items": seq.num_items, "categories": seq.num_categories,
              **{f"{k}_samples": len(v.label) for k, v in splits.items()}},
              "versions": versions()}
    resume = start_run(Path(run_dir), config, resume, overwrite)
    torch.manual_seed(cfg.seed)
    model = build_din(spec, seq, SparseOptimizer(cfg.sparse_optimizer, lr=cfg.sparse_lr, eps=cfg.sparse_eps))
    loaders = {k: SequenceBatches(seq, v, cfg.batch_size if k == "train" else 4096, shuffle=k == "train",
                                  seed=cfg.seed) for k, v in splits.items()}
    summary = fit(model, loaders["train"], loaders["val"], cfg, run_dir, resume=resume,
                  label=f"{spec['model']} {spec['method']} seed {cfg.seed}")
    load_best(model, Path(run_dir))
    summary["test"] = evaluate(model, loaders["test"])
    summary["settings"] = table_settings(model)
    write_json(Path(run_dir) / "summary.json", summary)
    return summary
