"""One training run from a plain, JSON-able spec: build, fit, test, score files.

``spec`` = {data, method, budget, dim, model, dense_arch, over_arch, table_options, train:
TrainConfig fields}.  ``table_options``: the method's own constructor arguments, one dict
for every feature's table or a list of one per feature (then no budget is sized).
It is written to ``config.json`` in the run directory with the id mode and versions, and
is all ``rectables eval`` needs to rebuild the model.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.schema import schema_of
from rectables.optim import SparseOptimizer
from rectables.registry import table_class
from rectables.runs import RunError, load_model, read_checkpoint, start_run, table_settings, versions, write_json
from rectables.train import TrainConfig, evaluate, fit

#: dense_arch None: [64, dim], or [dim] on data without dense features (see models.dlrm)
DEFAULT_SPEC = {"method": "full", "budget": 1.0, "dim": 16, "model": "dlrm",
                "dense_arch": None, "over_arch": [64, 1], "table_options": None}
#: tables' learning rate where the spec gives none: DeepFM's pairwise term sums 325 products
#: of field vectors, and row-wise Adagrad's first step moves every row by lr per coordinate
#: in much the same direction, so at 0.05 the term jumped to ~6-11 after one step
#: (multihash, unified on the Criteo sample: test logloss 1.1-1.4, worse than the base rate)
SPARSE_LR = {"dlrm": 0.05, "deepfm": 0.01}
#: an epoch should be at least this many optimizer steps where the data allows it
AUTO_STEPS = 100


def auto_batch_size(train_rows: int) -> int:
    """The batch size where the spec gives none (or "auto"): the largest power of two at
    most ``train_rows / AUTO_STEPS``, within [32, 4096].  Criteo at scale gets 4096; the
    7,177 training rows of the real Criteo sample get 64.  Measured there (DLRM, one
    epoch, 3 seeds, scored on the sample's latest 1,076 rows after training on the
    rest, benchmarks/real_data.py): batch 4096 (2 steps) 0.602 AUC; 256: 0.711; 64: 0.735;
    32: 0.740, against 0.717 for a logistic regression on the dense features.  More epochs only overfit:
    validation AUC fell after the first at every batch size tried."""
    return int(min(4096, max(32, 1 << max(0, (train_rows // AUTO_STEPS).bit_length() - 1))))


def build_model(spec: dict, meta: dict):
    from models.deepfm import DeepFM
    from models.dlrm import DLRM
    from rectables.embedding_modules import EmbeddingBagCollection

    from rectables.sizing import tables_for_budget

    cls, tcfg = table_class(spec["method"]), TrainConfig(**spec.get("train", {}))
    opt = SparseOptimizer(tcfg.sparse_optimizer, lr=tcfg.sparse_lr, eps=tcfg.sparse_eps)
    if spec.get("table_options"):
        tables = tables_from_options(cls, spec, meta["features"], meta["cardinalities"])
    else:
        tables = tables_for_budget(cls, spec["dim"], meta["features"], meta["cardinalities"], spec["budget"], opt)
    if meta["mode"] == "raw" and not cls.raw_ids:  # check_method let it through: it can hash raw ids
        for t in tables:
            t.hash_ids = True
    ebc = EmbeddingBagCollection(tables, opt)
    num_dense = len(schema_of(meta).dense)
    if spec["model"] == "dlrm":
        return DLRM(ebc, num_dense, spec["dense_arch"] or default_dense_arch(spec["dim"], meta), spec["over_arch"])
    if spec["model"] == "deepfm":
        return DeepFM(ebc, num_dense, spec["over_arch"][:-1])
    raise ValueError(f"unknown model {spec['model']!r}")


def tables_from_options(cls, spec: dict, features: list[str], cards: list[int]) -> list:
    """One table ``t_<feature>`` per feature built with ``spec["table_options"]`` (a dict
    for all, or a list of one per feature); the cardinality fills the method's size
    argument unless the options give it."""
    opts = spec["table_options"]
    per = opts if isinstance(opts, list) else [opts] * len(features)
    if len(per) != len(features) or not all(isinstance(o, dict) for o in per):
        raise ValueError(f"table_options: need one dict, or a list of {len(features)} (one per feature); got {opts!r}")
    if spec["budget"] != 1:
        raise ValueError(f"table_options set the tables' sizes; they take no budget (got {spec['budget']:g})")
    try:
        return [cls(f"t_{f}", spec["dim"], [f], **{cls.size_arg: n, **o}) for f, n, o in zip(features, cards, per)]
    except TypeError as e:
        raise ValueError(f"table_options for method {cls.method!r}: {e}") from None


def default_dense_arch(dim: int, meta: dict) -> list[int]:
    """DLRM's bottom MLP where the spec gives none: [64, dim], or [dim] without dense features."""
    return [64, dim] if schema_of(meta).dense else [dim]


def dataset_facts(meta: dict) -> dict:
    """What a trained model depends on in its dataset: a run records it and checks it."""
    return {k: meta[k] for k in ("mode", "rows", "cardinalities", "min_count", "seed", "source")}


class IncompatibleMethod(ValueError):
    """A method that cannot train on this dataset or at this budget; says why."""


def _can_hash_ids(cls) -> bool:
    """True for a method that takes ids in [0, n) but can hash raw ids into that range
    first (``hash_ids``, e.g. ``compositional``): on raw-id data it does so."""
    import inspect

    return "hash_ids" in inspect.signature(cls.__init__).parameters


def check_method(spec: dict, meta: dict) -> None:
    """Raise IncompatibleMethod before anything is built or written: a method that needs
    ids in [0, n) on raw 32-bit ids, or ``full`` (the uncompressed baseline) at a budget."""
    cls = table_class(spec["method"])
    check_budget(spec)
    if meta["mode"] == "raw" and not cls.raw_ids and not _can_hash_ids(cls):
        raise IncompatibleMethod(f"method {spec['method']!r} needs ids in [0, n), but this dataset holds raw ids "
                                 f"(preprocess --mode raw); preprocess with --mode vocab, or use a hashing method")


def check_budget(spec: dict) -> None:
    """A method that takes no budget (``full``, the uncompressed baseline; ``optembed``,
    which learns its size) at another budget than 1: IncompatibleMethod."""
    why = table_class(spec["method"]).no_budget
    if why and spec["budget"] != 1:
        raise IncompatibleMethod(f"method {spec['method']!r} {why} and has no budget; got budget "
                                 f"{spec['budget']:g} (leave it at 1, or choose a compressing method)")


def run_training(spec: dict, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 prepare=None, stage: dict | None = None) -> dict:
    """Train ``spec`` into ``run_dir``.  A directory holding a run needs ``resume`` (same
    settings, more epochs allowed) or ``overwrite``; both are checked before anything
    is written.  ``prepare(model)`` runs on the built model before a new run trains (a
    resumed one has its state in the checkpoint); ``stage`` is recorded in the config
    (a pipeline's stage and what it was given)."""
    from data.loader import CriteoBatches
    from data.preprocess import open_dataset

    spec = {**DEFAULT_SPEC, **spec}
    if "sparse_lr" not in spec.get("train", {}) and spec["model"] in SPARSE_LR:
        spec["train"] = {**spec.get("train", {}), "sparse_lr": SPARSE_LR[spec["model"]]}
    unknown = set(spec) - set(DEFAULT_SPEC) - {"data", "train"}
    if unknown:
        raise ValueError(f"unknown spec entries {sorted(unknown)}; known: {sorted(DEFAULT_SPEC) + ['data', 'train']}")
    run = Path(run_dir)
    spec["data"] = str(Path(spec["data"]).absolute())
    meta = open_dataset(spec["data"])
    check_method(spec, meta)
    if spec["dense_arch"] is None:
        spec["dense_arch"] = default_dense_arch(spec["dim"], meta)
    if spec.get("train", {}).get("batch_size", "auto") == "auto":
        spec["train"] = {**spec.get("train", {}), "batch_size": auto_batch_size(meta["splits"]["train"])}
    cfg = TrainConfig(**spec.get("train", {}))
    config = {**spec, "train": asdict(cfg), "id_mode": meta["mode"], "dataset": dataset_facts(meta),
              "versions": versions(), **({"stage": stage} if stage else {})}
    resume = start_run(run, config, resume, overwrite)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, meta)
    if prepare is not None and not resume:
        prepare(model)
    train = CriteoBatches(spec["data"], "train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = CriteoBatches(spec["data"], "val", 8192)
    from rectables.compare import budget_label

    label = f"{spec['method']} {budget_label(spec['budget'])} seed {cfg.seed}"
    summary = fit(model, train, val, cfg, run, resume=resume, label=label)
    load_best(model, run)
    summary["test"] = evaluate(model, CriteoBatches(spec["data"], "test", 8192))
    summary["settings"] = table_settings(model)
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


def score_file(run_dir: str | Path, path: str | Path, predictions: str | Path | None = None) -> dict:
    """Score a file in the run's data format (Criteo: 40 fields, or 39 without labels;
    a schema's file with or without its label column) with a trained run: AUC and
    logloss where there are labels, the share of each feature's values the run's
    vocabulary does not know (they read the OOV row), and with ``predictions`` one
    click probability per line written to that file (atomically).  ``path`` may also be
    the run's own preprocessed dataset: its test split is scored."""
    from data.criteo import dense_transform
    from data.preprocess import apply_vocab
    from data.schema import is_labelled, read_rows
    from rectables.metrics import StreamingMetrics
    from rectables.runs import atomic_write
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    run, path = Path(run_dir), Path(path)
    spec, meta = _open_run(run)
    data, schema = Path(spec["data"]), schema_of(meta)
    model = build_model(spec, meta)
    load_best(model, run)
    model.eval()
    if path.is_dir():
        return _score_dataset(model, spec, path, predictions)
    labelled = is_labelled(path, schema)
    names = meta["features"]
    vocabs = [np.load(data / f"vocab_{n}.npy") for n in names] if meta["mode"] == "vocab" else None
    m, probs, oov, n = StreamingMetrics(), [], np.zeros(len(names), dtype=np.int64), 0
    with torch.no_grad():
        for ch in read_rows(path, schema, chunk_rows=50_000, labelled=labelled):
            sp = ch.sparse if vocabs is None else np.stack([apply_vocab(ch.sparse[:, f], v) for f, v in enumerate(vocabs)], 1)
            if vocabs is not None:
                oov += (sp == meta["oov_id"]).sum(0)
            B = len(sp)
            n += B
            kjt = KeyedJaggedTensor.from_lengths_sync(names, torch.from_numpy(np.ascontiguousarray(sp.T)).reshape(-1),
                                                      torch.ones(B * sp.shape[1], dtype=torch.int64))
            logits = model(torch.from_numpy(dense_transform(ch.dense)), kjt)
            if labelled:
                m.update(logits, torch.from_numpy(ch.labels))
            if predictions is not None:
                probs.append(torch.sigmoid(logits).numpy())
    if predictions is not None:
        atomic_write(Path(predictions), lambda fh: np.savetxt(fh, np.concatenate(probs) if probs else [], fmt="%.6f"))
    out = {**(m.result() if labelled else {"auc": None, "logloss": None}), "n": n, "labelled": labelled}
    if vocabs is not None:
        out["oov_share"] = {name: float(c) / max(n, 1) for name, c in zip(names, oov)}
    return out


def _score_dataset(model, spec: dict, path: Path, predictions) -> dict:
    """The test split of the run's own dataset (another dataset's ids mean other rows)."""
    from data.loader import CriteoBatches
    from data.preprocess import open_dataset

    if path.resolve() != Path(spec["data"]).resolve() or dataset_facts(open_dataset(path)) != spec["dataset"]:
        raise ValueError(f"{path} is not the dataset this run was trained on ({spec['data']}): its ids would read "
                         f"other rows. Pass the Criteo-format file itself, which is mapped with the run's vocabulary")
    if predictions is not None:
        raise ValueError("--predictions takes a Criteo-format file, not a dataset directory")
    return {**evaluate(model, CriteoBatches(str(path), "test", 8192)), "labelled": True}
