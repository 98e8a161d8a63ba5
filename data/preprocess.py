"""Criteo TSV -> memmapped .npy (labels float32 [R], dense float32 [R, 13], sparse int64 [R, 26]).

Id modes, recorded in ``meta.json``:
- ``raw``: the parsed 32-bit hex ids (missing = -1), for hashed / unified / dynamic tables.
- ``vocab``: contiguous ids per feature: values seen at least ``min_count`` times in the
  *training split* get 1..V, everything else (unseen, rare) the OOV id 0.  Vocabularies are
  stored as ``vocab_C<i>.npy`` (sorted raw ids), never pickled.

The split (train / val / test row indices, ``split_<name>.npy``) is a seeded permutation.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from data.criteo import NUM_DENSE, NUM_SPARSE, SPARSE_NAMES, dense_transform, read_criteo

ARRAYS = {"labels": (np.float32, ()), "dense": (np.float32, (NUM_DENSE,)), "sparse": (np.int64, (NUM_SPARSE,))}


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


def preprocess(
    src: str | Path, out_dir: str | Path, mode: str = "vocab", min_count: int = 1,
    val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, skip_bad_lines: bool = False,
) -> dict:
    if mode not in ("raw", "vocab"):
        raise ValueError(f"mode must be 'raw' or 'vocab', got {mode!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: open(out / f"{k}.raw", "wb") for k in ARRAYS}
    rows = skipped = 0
    for ch in read_criteo(src, skip_bad_lines=skip_bad_lines):
        files["labels"].write(ch.labels.tobytes())
        files["dense"].write(dense_transform(ch.dense).tobytes())
        files["sparse"].write(ch.sparse.tobytes())
        rows += len(ch.labels)
        skipped += ch.skipped
    for k, fh in files.items():
        fh.close()
        _finish_npy(out / f"{k}.raw", out / f"{k}.npy", ARRAYS[k][0], ARRAYS[k][1], rows)
    perm = np.random.default_rng(seed).permutation(rows)
    n_test, n_val = int(rows * test_fraction), int(rows * val_fraction)
    splits = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    for name, idx in splits.items():
        np.save(out / f"split_{name}.npy", np.sort(idx))
    sparse = np.load(out / "sparse.npy", mmap_mode="r+")
    train = np.sort(splits["train"])
    cards = []
    for f, name in enumerate(SPARSE_NAMES):
        col = np.asarray(sparse[:, f])
        if mode == "vocab":
            vocab = fit_vocab(col[train], min_count)
            np.save(out / f"vocab_{name}.npy", vocab)
            sparse[:, f] = apply_vocab(col, vocab)
            cards.append(len(vocab) + 1)
        else:
            cards.append(int(len(np.unique(col[train]))))
    sparse.flush()
    meta = {
        "source": str(src), "mode": mode, "rows": rows, "skipped_lines": skipped, "min_count": min_count,
        "seed": seed, "splits": {k: len(v) for k, v in splits.items()}, "features": SPARSE_NAMES,
        "cardinalities": cards, "oov_id": 0 if mode == "vocab" else None,
        "missing_id": -1, "dense_transform": "log(1 + max(x, 0)), missing -> 0",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta
