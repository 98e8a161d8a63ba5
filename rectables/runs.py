"""Run directories: config.json, metrics.jsonl, memory.json, summary.json, checkpoints.

Every file is written atomically (temporary file + ``os.replace``, mode as the umask
gives): a kill leaves the previous version or the new one, never a torn one, and the
temporaries of killed writes are removed when the next run starts in the directory.
JSON files hold ``null`` for an undefined metric (never a bare ``NaN``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from rectables.optim import SparseOptimizer

RUN_FILES = ("config.json", "metrics.jsonl", "memory.json", "summary.json", "best.pt", "last.pt")
_TMP = ".tmp-"  # infix of every temporary: .<name>.tmp-<random>


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message says what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file in path's folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP}")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries that killed writes left in ``folder``; returns them."""
    stale = [p for p in Path(folder).glob(f".*{_TMP}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _dumps(obj, indent=None) -> str:
    return json.dumps(finite(obj), indent=indent, default=str, allow_nan=False)


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda fh: fh.write(_dumps(obj, indent=1).encode()))


def write_jsonl(path: Path, records: list) -> None:
    """The whole file, one record a line, atomically."""
    atomic_write(Path(path), lambda fh: fh.write("".join(_dumps(r) + "\n" for r in records).encode()))


def _collections(model) -> dict:
    from rectables.collection import _Collection

    return {n: m for n, m in model.named_modules() if isinstance(m, _Collection)}


def save_checkpoint(path: Path, model, dense_opt, state: dict) -> None:
    """Model (rows under torchrec's keys), the collections' fused optimizer state, the
    dense optimizer (None for a model without dense parameters) and the loop's state, in
    one atomic file."""
    blob = {"model": model.state_dict(), "dense_opt": dense_opt.state_dict() if dense_opt else {}, "state": state,
            "sparse_opt": {n: c.optimizer_state_dict() for n, c in _collections(model).items()}}
    atomic_write(Path(path), lambda fh: torch.save(blob, fh))


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``; RunError naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such checkpoint; the run never finished an epoch")
    try:
        blob = torch.load(path, weights_only=True)
        if not isinstance(blob, dict) or not {"model", "dense_opt", "state", "sparse_opt"} <= blob.keys():
            raise ValueError("not a rectables checkpoint")
    except Exception as e:  # torch raises many kinds for a torn file
        raise RunError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); it is truncated or "
                       f"corrupt: delete it, then resume from the other checkpoint of the run, or start over "
                       f"with --overwrite") from e
    return blob


def load_checkpoint(path: Path, model, dense_opt) -> dict:
    blob = read_checkpoint(path)
    load_model(model, blob)
    if dense_opt is not None:  # a model without dense parameters (LightGCN) has none
        dense_opt.load_state_dict(blob["dense_opt"])
    return blob["state"]


def load_model(model, blob: dict) -> None:
    """The model's state and its collections' fused optimizer state from a checkpoint."""
    model.load_state_dict(blob["model"])
    collections = _collections(model)
    if set(blob["sparse_opt"]) != set(collections):
        raise RunError(f"the checkpoint holds optimizer state for collections {sorted(blob['sparse_opt'])}, "
                       f"the model has {sorted(collections)}")
    for n, c in collections.items():
        c.load_optimizer_state_dict(blob["sparse_opt"][n])


def versions() -> dict:
    """What a run records of the software it ran on (may differ on --resume)."""
    import platform

    return {"torch": torch.__version__, "python": platform.python_version()}


def table_settings(model) -> dict:
    """How many tables ``model``'s collections hold, and the first one's settings (as an
    example: e.g. the item table of DIN, or a CTR model's first feature table)."""
    tables = [t for c in _collections(model).values() for t in c.tables]
    return {"tables": len(tables), **tables[0].settings()}


#: config entries that may change when a run is resumed
RESUMABLE = {"train.epochs", "train.progress", "versions"}
#: settings added after runs were made, at the value every earlier run had: a run that
#: lacks one resumes when it is asked at that value
ADDED = {"train.sparse_eps": SparseOptimizer.eps, "sparse_eps": SparseOptimizer.eps,
         "sampling": "interaction", "lr_decay": 1.0, "lr_decay_at": []}  # graph runs


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "dataset":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, requested: dict) -> list[str]:
    """'key: saved -> requested' for every entry that differs and may not change on resume."""
    a, b = _flat(saved), _flat(finite(json.loads(_dumps(requested))))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in RESUMABLE and not k.startswith("versions.")
            and not (k not in a and k in ADDED and b[k] == ADDED[k])]


def start_run(run: Path, config: dict, resume: bool, overwrite: bool) -> bool:
    """Check ``run`` against what is asked before anything is written; write config.json.

    A directory holding a run needs ``resume`` (with the same config, epochs aside) or
    ``overwrite`` (its run files are removed).  Returns True if there is a run to resume."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise RunError(f"{run} exists and is not a directory")
    present = [n for n in RUN_FILES if (run / n).exists()]
    if present and overwrite:
        for n in present:
            (run / n).unlink()
        present = []
    if present and not resume:
        raise RunError(f"{run} already holds a run ({', '.join(present)}); pass --resume to continue it "
                       f"or --overwrite to start over")
    if present:
        if not (run / "config.json").is_file():
            raise RunError(f"{run} holds run files but no config.json; start over with --overwrite")
        saved = json.loads((run / "config.json").read_text())
        diff = config_differences(saved, config)
        if diff:
            raise RunError(f"--resume asks for another run than the one in {run}:\n  " + "\n  ".join(diff)
                           + "\nuse the saved settings, another --run, or --overwrite to start over")
    if run.is_dir():
        clean_temporaries(run)
    write_json(run / "config.json", config)
    return bool(present) and (run / "last.pt").exists()
