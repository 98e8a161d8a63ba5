"""One training run from a plain, JSON-able spec: build, fit, test, score files.

``spec`` = {data, method, budget, dim, model, dense_arch, over_arch, train: TrainConfig fields}.
It is written to ``config.json`` in the run directory with the id mode and versions, and
is all ``rectables eval`` needs to rebuild the model.
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rectables.optim import SparseOptimizer
from rectables.registry import table_class
from rectables.runs import RunError, load_model, read_checkpoint, start_run, write_json
from rectables.train import TrainConfig, evaluate, fit

DEFAULT_SPEC = {"method": "full", "budget": 1.0, "dim": 16, "model": "dlrm",
                "dense_arch": [64, 16], "over_arch": [64, 1]}


def build_model(spec: dict, meta: dict):
    from models.deepfm import DeepFM
    from models.dlrm import DLRM
    from rectables.embedding_modules import EmbeddingBagCollection

    cls, tcfg = table_class(spec["method"]), TrainConfig(**spec.get("train", {}))
    tables = cls.for_budget_all(spec["dim"], meta["features"], meta["cardinalities"], spec["budget"])
    ebc = EmbeddingBagCollection(tables, SparseOptimizer(tcfg.sparse_optimizer, lr=tcfg.sparse_lr))
    if spec["model"] == "dlrm":
        return DLRM(ebc, 13, spec["dense_arch"], spec["over_arch"])
    if spec["model"] == "deepfm":
        return DeepFM(ebc, 13, spec["over_arch"][:-1])
    raise ValueError(f"unknown model {spec['model']!r}")


def dataset_facts(meta: dict) -> dict:
    """What a trained model depends on in its dataset: a run records it and checks it."""
    return {k: meta[k] for k in ("mode", "rows", "cardinalities", "min_count", "seed", "source")}


class IncompatibleMethod(ValueError):
    """A method that cannot train on this dataset or at this budget; says why."""


def check_method(spec: dict, meta: dict) -> None:
    """Raise IncompatibleMethod before anything is built or written: a method that needs
    ids in [0, n) on raw 32-bit ids, or ``full`` (the uncompressed baseline) at a budget."""
    cls = table_class(spec["method"])
    if spec["method"] == "full" and spec["budget"] != 1:
        raise IncompatibleMethod(f"method 'full' is the uncompressed baseline and has no budget; got budget "
                                 f"{spec['budget']:g} (leave it at 1, or choose a compressing method)")
    if meta["mode"] == "raw" and not cls.raw_ids:
        raise IncompatibleMethod(f"method {spec['method']!r} needs ids in [0, n), but this dataset holds raw ids "
                                 f"(preprocess --mode raw); preprocess with --mode vocab, or use a hashing method")


def run_training(spec: dict, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``spec`` into ``run_dir``.  A directory holding a run needs ``resume`` (same
    settings, more epochs allowed) or ``overwrite``; both are checked before anything
    is written."""
    from data.loader import CriteoBatches
    from data.preprocess import open_dataset

    spec = {**DEFAULT_SPEC, **spec}
    unknown = set(spec) - set(DEFAULT_SPEC) - {"data", "train"}
    if unknown:
        raise ValueError(f"unknown spec entries {sorted(unknown)}; known: {sorted(DEFAULT_SPEC) + ['data', 'train']}")
    run = Path(run_dir)
    spec["data"] = str(Path(spec["data"]).absolute())
    meta = open_dataset(spec["data"])
    check_method(spec, meta)
    cfg = TrainConfig(**spec.get("train", {}))
    config = {**spec, "train": asdict(cfg), "id_mode": meta["mode"], "dataset": dataset_facts(meta),
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    resume = start_run(run, config, resume, overwrite)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, meta)
    train = CriteoBatches(spec["data"], "train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = CriteoBatches(spec["data"], "val", 8192)
    summary = fit(model, train, val, cfg, run, resume=resume)
    load_best(model, run)
    summary["test"] = evaluate(model, CriteoBatches(spec["data"], "test", 8192))
    write_json(run / "summary.json", summary)
    return summary


def load_best(model, run: Path) -> None:
    load_model(model, read_checkpoint(Path(run) / "best.pt"))


def _open_run(run: Path) -> tuple[dict, dict]:
    """(config, meta) of a trained run whose dataset is still the one it was trained on."""
    from data.preprocess import open_dataset

    if not (run / "config.json").is_file():
        raise RunError(f"{run} holds no run (no config.json)")
    spec = json.loads((run / "config.json").read_text())
    meta = open_dataset(spec["data"])
    if "dataset" in spec and dataset_facts(meta) != spec["dataset"]:
        was, now = spec["dataset"], dataset_facts(meta)
        diff = [f"{k}: {_short(was.get(k))} -> {_short(now.get(k))}" for k in now if was.get(k) != now.get(k)]
        raise RunError(f"the dataset {spec['data']} has changed since run {run} was trained on it "
                       f"({'; '.join(diff)}); preprocess it again as it was, or train a new run")
    return spec, meta


def _short(v) -> str:
    return repr(v) if not isinstance(v, list) or len(v) <= 4 else f"[{', '.join(map(str, v[:4]))}, ...]"


def score_file(run_dir: str | Path, path: str | Path) -> dict:
    """AUC / logloss of a trained run on another Criteo-format file (vocab of its data)."""
    from data.criteo import SPARSE_NAMES, dense_transform, read_criteo
    from data.preprocess import apply_vocab
    from rectables.metrics import StreamingMetrics
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    run = Path(run_dir)
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory; eval --data takes a Criteo-format file (.tsv or .tsv.gz)")
    spec, meta = _open_run(run)
    data = Path(spec["data"])
    model = build_model(spec, meta)
    load_best(model, run)
    model.eval()
    vocabs = [np.load(data / f"vocab_{n}.npy") for n in SPARSE_NAMES] if meta["mode"] == "vocab" else None
    m = StreamingMetrics()
    with torch.no_grad():
        for ch in read_criteo(path, chunk_rows=50_000):
            sp = ch.sparse if vocabs is None else np.stack([apply_vocab(ch.sparse[:, f], v) for f, v in enumerate(vocabs)], 1)
            B = len(sp)
            kjt = KeyedJaggedTensor.from_lengths_sync(meta["features"], torch.from_numpy(np.ascontiguousarray(sp.T)).reshape(-1),
                                                      torch.ones(B * sp.shape[1], dtype=torch.int64))
            m.update(model(torch.from_numpy(dense_transform(ch.dense)), kjt), torch.from_numpy(ch.labels))
    return m.result()
