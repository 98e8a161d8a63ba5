"""CTR file -> memmapped .npy (labels float32 [R], dense float32 [R, Nd], sparse int64 [R, F]).

The file's columns follow a schema (:mod:`data.schema`): ``criteo`` (label, 13 integers,
26 hex ids: Nd = 13, F = 26), ``avazu`` (Nd = 0, F = 23) or a declared JSON schema; the
dataset's ``meta.json`` records it, with the dense and categorical feature names.

Id modes, recorded in ``meta.json``:
- ``raw``: the parsed 32-bit hex ids (missing = -1), for hashed / unified / dynamic tables.
- ``vocab``: contiguous ids per feature: values seen at least ``min_count`` times in the
  *training split* get 1..V, everything else (unseen, rare) the OOV id 0.  Vocabularies are
  stored as ``vocab_C<i>.npy`` (sorted raw ids), never pickled.

The split (train / val / test row indices, ``split_<name>.npy``) is a seeded permutation.

A dataset is written whole into a temporary sibling directory and then swapped in (an
atomic directory exchange on Linux), so a kill at any point leaves the old dataset or
the new one, never a mix; :func:`open_dataset` checks every array against ``meta.json``.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data.criteo import DENSE_NAMES, CriteoFormatError, dense_transform
from data.schema import Schema, get_schema, read_rows

FORMAT = 1  # version of the directory layout, in meta.json


def arrays(meta: dict) -> dict:
    """name -> (dtype, shape of a row) of a dataset's arrays (meta of a schema or older)."""
    nd = len(meta.get("dense_features", DENSE_NAMES))  # datasets written before schemas are Criteo's
    return {"labels": (np.float32, ()), "dense": (np.float32, (nd,)), "sparse": (np.int64, (len(meta["features"]),))}


def _finish_npy(raw: Path, out: Path, dtype, tail: tuple, rows: int) -> None:
    """Prefix the raw bytes in ``raw`` with an .npy header -> ``out`` (streamed)."""
    with open(out, "wb") as fo, open(raw, "rb") as fi:
        np.lib.format.write_array_header_1_0(
            fo, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (rows, *tail)}
        )
        shutil.copyfileobj(fi, fo, 1 << 24)
    raw.unlink()


def fit_vocab(col: np.ndarray, min_count: int) -> np.ndarray:
    """Sorted raw ids seen >= min_count times."""
    uniq, counts = np.unique(col, return_counts=True)
    return uniq[counts >= min_count]


def apply_vocab(col: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Raw ids -> 1..V (position in vocab + 1), 0 for ids not in vocab."""
    if len(vocab) == 0:
        return np.zeros_like(col)
    pos = np.searchsorted(vocab, col).clip(max=len(vocab) - 1)
    return np.where(vocab[pos] == col, pos + 1, 0)


class DatasetError(ValueError):
    """A preprocessed directory that is missing, incomplete or not what a run expects."""


def preprocess(
    src: str | Path, out_dir: str | Path, mode: str = "vocab", min_count: int = 2,
    val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, skip_bad_lines: bool = False,
    overwrite: bool = False, schema: str | dict | Schema = "criteo",
) -> dict:
    """Parse ``src`` (columns as ``schema`` declares: a name, a JSON file or a Schema)
    into a dataset directory ``out_dir``; returns its meta.

    An existing dataset at ``out_dir`` is replaced atomically; a non-empty directory that
    is not a dataset is refused unless ``overwrite``.  An input without rows, or too few
    for every split to get one, is refused."""
    if mode not in ("raw", "vocab"):
        raise ValueError(f"mode must be 'raw' or 'vocab', got {mode!r}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be > 0 and sum to < 1, got {val_fraction}, {test_fraction}")
    schema = get_schema(schema)
    out = Path(out_dir).absolute()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        meta = _write(Path(src), tmp, schema, mode, min_count, val_fraction, test_fraction, seed, skip_bad_lines)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new data if it failed, else the old dataset
    return meta


def _write(src: Path, out: Path, schema: Schema, mode, min_count, val_fraction, test_fraction, seed,
           skip_bad_lines) -> dict:
    shapes = arrays({"features": schema.features, "dense_features": schema.dense})
    files = {k: open(out / f"{k}.raw", "wb") for k in shapes}
    rows = skipped = 0
    try:
        for ch in read_rows(src, schema, skip_bad_lines=skip_bad_lines):
            files["labels"].write(ch.labels.tobytes())
            files["dense"].write(dense_transform(ch.dense).tobytes())
            files["sparse"].write(ch.sparse.tobytes())
            rows += len(ch.labels)
            skipped += ch.skipped
    finally:
        for fh in files.values():
            fh.close()
    n_test, n_val = int(rows * test_fraction), int(rows * val_fraction)
    if min(n_test, n_val, rows - n_test - n_val) < 1:
        raise CriteoFormatError(f"{src}: {rows} rows ({skipped} bad lines skipped) are too few for a train, "
                                f"validation and test split of at least one row each; nothing was written")
    for k, (dtype, tail) in shapes.items():
        _finish_npy(out / f"{k}.raw", out / f"{k}.npy", dtype, tail, rows)
    perm = np.random.default_rng(seed).permutation(rows)
    splits = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    for name, idx in splits.items():
        np.save(out / f"split_{name}.npy", np.sort(idx))
    sparse = np.load(out / "sparse.npy", mmap_mode="r+")
    train = np.sort(splits["train"])
    cards = []
    for f, name in enumerate(schema.features):
        col = np.asarray(sparse[:, f])
        if mode == "vocab":
            vocab = fit_vocab(col[train], min_count)
            np.save(out / f"vocab_{name}.npy", vocab)
            sparse[:, f] = apply_vocab(col, vocab)
            cards.append(len(vocab) + 1)
        else:
            cards.append(int(len(np.unique(col[train]))))
    sparse.flush()
    del sparse
    meta = {
        "format": FORMAT, "source": str(src.absolute()), "mode": mode, "rows": rows, "skipped_lines": skipped,
        "min_count": min_count, "seed": seed, "splits": {k: len(v) for k, v in splits.items()},
        "features": schema.features, "cardinalities": cards, "oov_id": 0 if mode == "vocab" else None,
        "missing_id": -1, "dense_features": schema.dense, "dense_transform": "log(1 + max(x, 0)), missing -> 0",
        "schema": schema.to_dict(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def open_dataset(data_dir: str | Path) -> dict:
    """meta.json of a dataset directory, after checking that every array it names is
    there with the rows meta.json says; :class:`DatasetError` says what is wrong."""
    d = Path(data_dir)
    if not (d / "meta.json").is_file():
        raise DatasetError(f"{d} is not a preprocessed dataset (no meta.json); run `rectables preprocess` first")
    def load(name: str) -> np.ndarray:
        try:
            return np.load(d / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{d / name}: cannot be read ({e})") from e

    try:
        meta = json.loads((d / "meta.json").read_text())
        rows, splits = meta["rows"], meta["splits"]
        for k, (dtype, tail) in arrays(meta).items():
            a = load(f"{k}.npy")
            if a.dtype != dtype or a.shape != (rows, *tail):
                raise DatasetError(f"{k}.npy holds {a.dtype} {a.shape}, meta.json says {np.dtype(dtype)} {(rows, *tail)}")
        for k, n in splits.items():
            if n < 1:
                raise DatasetError(f"its {k} split is empty")
            idx = load(f"split_{k}.npy")
            if len(idx) != n or (n and not 0 <= idx[0] <= idx[-1] < rows):
                raise DatasetError(f"split_{k}.npy does not match meta.json")
        if meta["mode"] == "vocab":
            for name, card in zip(meta["features"], meta["cardinalities"]):
                if len(load(f"vocab_{name}.npy")) != card - 1:
                    raise DatasetError(f"vocab_{name}.npy does not match meta.json")
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"dataset {d} is incomplete or inconsistent: {e}; run `rectables preprocess` again") from e
    return meta


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file() and not overwrite:
        raise FileExistsError(f"{out} is a non-empty directory that is not a dataset; "
                              "choose another --out or pass --overwrite to replace it")


def _clean_stale(out: Path) -> None:
    """Remove temporaries left by killed runs (their pid is gone) next to ``out``."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(out.name) + 6 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(new: Path, out: Path) -> None:
    """Make ``new`` the directory ``out``; the old ``out`` (if any) ends up at ``new``.
    Atomic: renameat2(RENAME_EXCHANGE) on Linux; elsewhere two renames (a kill between
    them leaves no ``out``, and the old data at ``new``)."""
    try:
        os.rename(new, out)  # out missing or empty: atomic
        return
    except OSError:
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    if exchange is not None:
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if exchange(AT_FDCWD, bytes(new), AT_FDCWD, bytes(out), RENAME_EXCHANGE) == 0:
            return
    side = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, side / "old")
    os.rename(new, out)
    os.rename(side / "old", new)
    side.rmdir()
