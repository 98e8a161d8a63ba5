"""Run directories: config.json, metrics.jsonl, memory.json, summary.json, checkpoints.

Every file is written atomically (temporary file + ``os.replace``): a crash leaves the
previous version, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file in path's folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda fh: fh.write(json.dumps(obj, indent=1, default=str).encode()))


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj, default=str) + "\n")


def save_checkpoint(path: Path, model, dense_opt, state: dict) -> None:
    blob = {"model": model.state_dict(), "dense_opt": dense_opt.state_dict(), "state": state}
    atomic_write(Path(path), lambda fh: torch.save(blob, fh))


def load_checkpoint(path: Path, model, dense_opt) -> dict:
    blob = torch.load(path, weights_only=True)
    model.load_state_dict(blob["model"])
    dense_opt.load_state_dict(blob["dense_opt"])
    return blob["state"]
