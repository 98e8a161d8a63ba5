"""OptEmbed's pipeline (Lyu et al., CIKM 2022) on a CTR dataset, stage by stage, each
leaving its files in the run directory:

1. ``supernet/``: the ``optembed`` tables trained with learned row thresholds and sampled
   dim prefixes (a CTR run: config, metrics, checkpoints, summary); ``init.pt`` holds
   the model as it was before its first step.
2. ``search.jsonl`` (one line per round: best and mean fitness, best dims) and
   ``search.json``: the evolutionary search over per-feature dims
   (``rectables/evolution.py``) on the trained supernet, fitness = validation AUC.
3. ``retrain/``: the model again from ``init.pt`` with the supernet's row mask and the
   chosen dims fixed (a CTR run).
4. ``export/``: the ``compact`` tables (kept rows only, each feature at its dim, zero
   padded) with the retrained rows, as a run ``rectables eval`` can score; its summary
   holds the test metrics, the bytes, the share of rows pruned per feature, the dims, the
   largest difference from the retrained model's output and the time of every stage.

``spec``: a CTR spec (``rectables/experiment.py``) with ``method`` "optembed", its
``table_options`` (alpha, threshold_lr, threshold_init, candidate_dims) and ``search``
(``evolution.evolve``'s settings).  The supernet trains with ``train.sparse_eps``
SUPERNET_EPS unless the spec sets it; retraining uses the spec's (default 1e-8).  A stage
already done is not run again with ``resume``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

STAGES = ("supernet", "search", "retrain", "export")
SEARCH = {"population": 20, "mutations": 10, "crossovers": 10, "rounds": 30, "prob": 0.1, "parents": 15, "seed": 0}
#: the tables' defaults: the paper's alpha range tops at 1e-4; its threshold rate (1e-4) is
#: for epochs of ~20k steps, ours are of ~200 (the demo's 800k rows at batch 4096).  On the
#: demo data (seeds 0, 1; every stage and `full` at sparse epsilon 1e-5) alpha 1e-4, 1.25e-4
#: and 1.5e-4 pruned 40%, 49% and 55% of the rows for 0.0006, 0.0011 and 0.0012 AUC with
#: the dim search; 1.25e-4 and 1.5e-4 pruned 54% and 58% for 0.0006 and 0.0007 with rows
#: only (candidate dims {16}).
TABLE = {"alpha": 1.25e-4, "threshold_lr": 0.0012, "threshold_init": 0.0, "candidate_dims": None}
#: the sparse optimizer's epsilon in the supernet stage where the spec sets none.  With
#: row-wise Adagrad's 1e-8 a row seen twice moves about as far as a frequent one (its first
#: steps are ~lr whatever the gradient), so row norms barely rank rows by use: on the demo
#: data the mask pruned 44% of the rows but 18% of the id occurrences, -0.0048 AUC after
#: retraining at all dims.  With 1e-5 the small gradients of rare rows move them little:
#: 41-60% pruned (threshold rate 0.001-0.0015) with 3.5-6.9% of the occurrences, -0.0008
#: to -0.0018 (seed 0; pruning by frequency: 42% at -0.0008, 59% at -0.0012).
SUPERNET_EPS = 1e-5


def _collection(model) -> tuple[str, object]:
    """(name, collection) of a CTR model's one embedding collection."""
    from rectables.runs import _collections

    (name, coll), = _collections(model).items()
    return name, coll


def _tables(model) -> list:
    return list(_collection(model)[1].tables)


def _rows(model, t) -> list[torch.Tensor]:
    """The physical tables [n + 1, D] of table ``t``, one per feature."""
    return _collection(model)[1].table_weights(t.name)


def _set_dims(model, dims: list[int] | None) -> None:
    i = 0
    for t in _tables(model):
        n = len(t.feature_names)
        t.set_dims(None if dims is None else dims[i : i + n])
        i += n


def run_optembed(spec: dict, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 until: str = "export") -> dict:
    """The stages up to ``until`` into ``run_dir``; returns the last stage's summary (the
    export's: a CTR run's summary with the exported tables' memory and test metrics)."""
    from rectables.experiment import run_training
    from rectables.runs import RunError

    run = Path(run_dir)
    if spec.get("method", "optembed") != "optembed":
        raise ValueError(f"the OptEmbed pipeline trains method 'optembed', not {spec['method']!r}")
    unknown = set(spec.get("search") or {}) - set(SEARCH)
    unknown |= set(spec.get("table_options") or {}) - set(TABLE)
    if unknown:
        raise ValueError(f"unknown OptEmbed settings {sorted(unknown)}; table_options: {sorted(TABLE)}, "
                         f"search: {sorted(SEARCH)}")
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    search_cfg = {**SEARCH, **(spec.get("search") or {})}
    base = {k: v for k, v in spec.items() if k != "search"}
    base = {**base, "method": "optembed", "table_options": {**TABLE, **(spec.get("table_options") or {})}}
    if (run / "export" / "summary.json").exists() and not (resume or overwrite):
        raise RunError(f"{run} already holds an OptEmbed run; pass --resume to continue it or --overwrite")
    run.mkdir(parents=True, exist_ok=True)

    sup_spec = {**base, "train": {"sparse_eps": SUPERNET_EPS, **base.get("train", {})}}
    sup = run_training(sup_spec, run / "supernet", resume, overwrite, prepare=lambda m: _save_init(m, run / "init.pt"))
    if until == "supernet":
        return sup

    found = _search(base, run, search_cfg, resume and not overwrite)
    if until == "search":
        return found

    keep = _keep_masks(base, run / "supernet")
    stage = {"name": "retrain", "dims": found["dims"], "pruned": _pruned_share(keep)}
    ret = run_training(base, run / "retrain", resume, overwrite, prepare=lambda m: _fix(m, run / "init.pt", keep,
                                                                                        found["dims"]), stage=stage)
    if until == "retrain":
        return ret

    t0 = time.perf_counter()
    summary = _export(base, run, ret, sup)
    # seconds of each stage's own work (training epochs, search, export), whichever call ran it
    summary["stages"] = {"supernet_s": _train_seconds(sup), "search_s": found["seconds"],
                         "retrain_s": _train_seconds(ret), "export_s": time.perf_counter() - t0}
    from rectables.runs import write_json

    write_json(run / "export" / "summary.json", summary)
    return summary


def _train_seconds(summary: dict) -> float:
    return sum(h["seconds"] for h in summary["history"])


def _save_init(model, path: Path) -> None:
    from rectables.runs import save_checkpoint

    save_checkpoint(path, model, None, {"stage": "init"})


def _open(spec: dict, run: Path):
    """(model, meta) of the trained (best) model of the CTR run in ``run``."""
    from data.preprocess import open_dataset
    from rectables.experiment import build_model, load_best

    meta = open_dataset(spec["data"])
    model = build_model(json.loads((run / "config.json").read_text()), meta)
    load_best(model, run)
    return model, meta


def _search(spec: dict, run: Path, cfg: dict, resume: bool) -> dict:
    """Stage 2 (``search.json``, ``search.jsonl``): reused if done with these settings."""
    from data.loader import CriteoBatches
    from rectables.evolution import evolve
    from rectables.runs import write_json, write_jsonl

    done = run / "search.json"
    if resume and done.exists():
        saved = json.loads(done.read_text())
        if saved.get("settings") == cfg:
            return saved
    model, meta = _open(spec, run / "supernet")
    val = CriteoBatches(spec["data"], "val", 8192)
    tables = _tables(model)
    cands = tables[0].candidate_dims
    history: list[dict] = []
    fitness = cached_fitness(model, val)

    def log(record: dict) -> None:
        history.append(record)
        write_jsonl(run / "search.jsonl", history)
        if spec.get("train", {}).get("progress", True):
            print(f"search round {record['round']}: best {record['best']:.4f}, mean {record['mean']:.4f}", flush=True)

    t0 = time.perf_counter()
    out = evolve(fitness, len(meta["features"]), cands, log=log, **cfg)
    result = {**out, "settings": cfg, "full_dims_fitness": fitness([cands[-1]] * len(meta["features"])),
              "seconds": time.perf_counter() - t0, "evaluations": history[-1]["scored"]}
    write_json(done, result)
    return result


class _Replay(torch.nn.Module):
    """Stands in for a model's collection during the search: the current batch's cached
    lookup [B, sum D] (``values``), whatever the features."""

    def __init__(self, collection) -> None:
        super().__init__()
        self.keys, self.dims, self.values = collection.output_names, collection.dims, None

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        return KeyedTensor(keys=self.keys, length_per_key=self.dims, values=self.values)


CACHE_BYTES = 2 << 30  # the search caches the validation lookups up to this size


def cached_fitness(model, val):
    """fitness(dims) = validation AUC of the supernet ``model`` with feature f at its first
    dims[f] dims.  A dim prefix commutes with pooling, so the row-masked lookup of every
    validation batch is made once and each candidate multiplies it by its prefix mask and
    runs the rest of the model (the same AUC as a full evaluation with ``set_dims``;
    2.1-2.6x faster on the demo data, 0.15-0.17 against 0.36-0.40 s per candidate).  Validation lookups larger than CACHE_BYTES are looked up per candidate."""
    from rectables.metrics import StreamingMetrics
    from rectables.train import evaluate

    name, coll = _collection(model)
    if len(val) * val.batch_size * sum(coll.dims) * 4 > CACHE_BYTES:
        def slow(dims: list[int]) -> float:
            _set_dims(model, dims)
            return evaluate(model, val)["auc"]
        return slow
    parent = model.get_submodule(name.rpartition(".")[0])
    attr = name.rpartition(".")[2]
    model.eval()
    _set_dims(model, None)
    with torch.no_grad():
        cache = [(b.dense, coll(b.sparse).values(), b.labels) for b in val]
    replay = _Replay(coll)

    def fitness(dims: list[int]) -> float:
        mask = torch.cat([(torch.arange(D) < d).float() for d, D in zip(dims, coll.dims)])
        m = StreamingMetrics()
        setattr(parent, attr, replay)
        try:
            with torch.no_grad():
                for dense, values, labels in cache:
                    replay.values = values * mask
                    m.update(model(dense, None), labels)
        finally:
            setattr(parent, attr, coll)
        return m.result()["auc"]
    return fitness


def _keep_masks(spec: dict, supernet: Path) -> list[torch.Tensor]:
    """Rows kept [1, n] by each feature's table, from the trained supernet."""
    model, _ = _open(spec, supernet)
    return [t.row_masks(_rows(model, t)) for t in _tables(model)]


def _pruned_share(keep: list[torch.Tensor]) -> list[float]:
    return [round(1 - float(k.float().mean()), 4) for k in keep]


def _fix(model, init: Path, keep: list[torch.Tensor], dims: list[int]) -> None:
    """The model as the supernet began (rows, dense weights), then the mask and dims fixed."""
    from rectables.runs import load_model, read_checkpoint

    load_model(model, read_checkpoint(init))
    i = 0
    for t, k in zip(_tables(model), keep):
        n = len(t.feature_names)
        t.fix(k, dims[i : i + n])
        i += n


def _export(spec: dict, run: Path, retrained: dict, supernet: dict) -> dict:
    """Stage 4: compact tables with the retrained rows; a run in ``export/``."""
    from data.loader import CriteoBatches
    from rectables.experiment import build_model
    from rectables.memory import memory_report
    from rectables.runs import save_checkpoint, write_json
    from rectables.train import evaluate

    model, meta = _open(spec, run / "retrain")
    compact, rows = [], []
    for t in _tables(model):
        table, r = t.compact(_rows(model, t))
        compact.append(table)
        rows.append(r)
    options = [{"rows": t.rows, "dims": t.dims} for t in compact]
    ex_spec = {**json.loads((run / "retrain" / "config.json").read_text()), "method": "compact",
               "table_options": options, "stage": {"name": "export", "from": str(run / "retrain")}}
    exported = build_model(ex_spec, meta)
    with torch.no_grad():
        for new, old_rows, t in zip(_tables(exported), rows, compact):
            new.id_rows.copy_(t.id_rows)
            for w, r in zip(_rows(exported, new), old_rows):
                w.copy_(r)
        tables = (_collection(model)[0] + ".",)  # the dense rest of the model, as retrained
        missing, _ = exported.load_state_dict({k: v for k, v in model.state_dict().items()
                                               if not k.startswith(tables)}, strict=False)
        assert all(k.startswith(tables) for k in missing), missing
    test = CriteoBatches(spec["data"], "test", 8192)
    model.eval()
    exported.eval()
    diff = 0.0
    with torch.no_grad():
        for batch in test:
            a, b = model(batch.dense, batch.sparse), exported(batch.dense, batch.sparse)
            diff = max(diff, float((a - b).abs().max()))
    out = run / "export"
    write_json(out / "config.json", ex_spec)
    save_checkpoint(out / "best.pt", exported, None, {"stage": "export"})
    summary = {**{k: retrained[k] for k in ("config", "best_val_auc", "best_epoch", "selected_by", "epochs", "history")},
               "test": evaluate(exported, test), "memory": memory_report(exported),
               "retrained_test": retrained["test"], "supernet_test": supernet["test"],
               "dims": [d for t in compact for d in t.dims],
               "pruned": [round(1 - r / t.num_ids, 4) for t in compact for r in t.rows],
               "rows_pruned": 1 - sum(sum(t.rows) for t in compact) / sum(t.num_ids * len(t.rows) for t in compact),
               "max_abs_diff_vs_retrained": diff}
    # what a comparison shows next to the row (the per-feature lists are in the summary)
    summary["settings"] = {"tables": len(compact), "rows_pruned": round(summary["rows_pruned"], 3),
                           "mean_dim": round(sum(summary["dims"]) / len(summary["dims"]), 1)}
    write_json(out / "memory.json", summary["memory"])
    return summary
