"""Streaming reader of Criteo-format TSV (label, I1..I13, C1..C26; plain or .gz; no header).

Policy (documented, tested):
- C columns: 8 hex digits -> int64 raw id in [0, 2^32); empty -> ``MISSING_ID`` (-1),
  which can never collide with a real id.
- I columns: integers; empty -> 0 (a missing integer and a 0 read the same after
  ``dense_transform``); the transform is log(1 + max(x, 0)).
- A malformed line (wrong column count, non-hex id, non-integer dense value, label
  not 0/1) raises ``CriteoFormatError`` naming file, line and column, unless
  ``skip_bad_lines`` is set: then it is dropped and counted.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

NUM_DENSE, NUM_SPARSE = 13, 26
DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
COLUMNS = ["label", *DENSE_NAMES, *SPARSE_NAMES]
MISSING_ID = -1

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


class CriteoFormatError(ValueError):
    """A malformed line; the message names file, line and column."""


@dataclass
class Chunk:
    """Rows [R] of a file: labels float32 [R], dense float32 [R, 13] (raw, missing = 0), sparse int64 [R, 26]."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    first_line: int  # 1-based line number of the chunk's first row
    skipped: int = 0


def dense_transform(dense: np.ndarray) -> np.ndarray:
    """log(1 + max(x, 0)), float32."""
    return np.log1p(np.maximum(dense, 0, dtype=np.float32)).astype(np.float32)


def _open(path: Path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """Whole lines, about ``block_bytes`` at a time; a missing final newline is added."""
    rest = b""
    with _open(path) as f:
        while True:
            try:
                data = f.read(block_bytes)
            except (EOFError, gzip.BadGzipFile) as e:
                raise CriteoFormatError(f"{path}: truncated or corrupt gzip ({e})") from e
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
    if rest:
        yield rest + b"\n"


def _hex_to_int(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-width bytes [R] ('S9' to catch 9+ chars) -> (ids int64 [R], bad bool [R])."""
    raw = col.view(np.uint8).reshape(len(col), -1)
    width = (raw != 0).sum(1)
    nib = _HEX[raw[:, :8]]
    bad = ((nib == 255) & (raw[:, :8] != 0)).any(1) | (width > 8) | ((width > 0) & (width < 8))
    pairs = np.ascontiguousarray((nib[:, 0::2] << 4) | (nib[:, 1::2] & 15))  # [R, 4] bytes
    ids = pairs.view(">u4").ravel().astype(np.int64)
    ids[width == 0] = MISSING_ID
    return ids, bad


def read_criteo(
    path: str | Path, chunk_rows: int = 200_000, skip_bad_lines: bool = False, labelled: bool = True
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s of about ``chunk_rows`` rows; never the whole file in memory."""
    path = Path(path)
    ncol = len(COLUMNS) - (0 if labelled else 1)
    names = COLUMNS if labelled else COLUMNS[1:]
    line = 1
    for block in _blocks(path, chunk_rows * 160):
        buf = np.frombuffer(block, dtype=np.uint8)
        ends = np.flatnonzero(buf == 10)
        tabs = np.searchsorted(np.flatnonzero(buf == 9), ends)  # tabs before each line end
        per_line = np.diff(tabs, prepend=0) + 1
        bad = per_line != ncol
        if bad.any() and not skip_bad_lines:
            i = int(np.flatnonzero(bad)[0])
            raise CriteoFormatError(f"{path}:{line + i}: expected {ncol} tab-separated columns, found {per_line[i]}")
        if bad.any():
            starts = np.concatenate([[0], ends[:-1] + 1])
            keep = [block[s : e + 1] for s, e, b in zip(starts, ends, bad) if not b]
            rows_line = line + np.flatnonzero(~bad)
            block = b"".join(keep)
        else:
            rows_line = line + np.arange(len(ends))
        skipped = int(bad.sum())
        line += len(ends)
        if not block:
            continue
        data = io.BytesIO(block)
        common = dict(sep="\t", header=None, names=names, engine="c", quoting=3)
        try:  # fast path: typed columns
            df = pd.read_csv(data, dtype={**{c: "float64" for c in names[: ncol - NUM_SPARSE]},
                                          **{c: object for c in SPARSE_NAMES}}, **common)
        except ValueError:  # a non-numeric value somewhere: strict path names the line
            data.seek(0)
            df = pd.read_csv(data, dtype=object, keep_default_na=False, na_values=[""], **common)
        yield _convert(df, path, rows_line, labelled, skip_bad_lines, skipped)


def _numeric(s: pd.Series) -> np.ndarray:
    if s.dtype == object:
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return s.to_numpy(dtype=np.float64)


def _convert(df: pd.DataFrame, path, rows_line, labelled, skip_bad_lines, skipped) -> Chunk:
    n = len(df)
    bad_row = np.zeros(n, dtype=bool)
    errors: list[tuple[int, str]] = []

    def fail(mask: np.ndarray, what: str) -> None:
        if mask.any():
            bad_row[mask] = True
            errors.append((int(np.flatnonzero(mask)[0]), what))

    labels = np.zeros(n, dtype=np.float32)
    if labelled:
        lab = _numeric(df["label"])
        fail(~np.isin(lab, (0.0, 1.0)), "label must be 0 or 1")
        labels = np.nan_to_num(lab).astype(np.float32)
    dense = np.zeros((n, NUM_DENSE), dtype=np.float32)
    for j, c in enumerate(DENSE_NAMES):
        s = df[c]
        v = _numeric(s)
        text_bad = np.isnan(v) & s.notna().to_numpy() if s.dtype == object else np.isinf(v)
        fail(text_bad | (np.isfinite(v) & (v != np.round(v))), f"column {c}: not an integer")
        dense[:, j] = np.nan_to_num(v, nan=0.0)
    sparse = np.empty((n, NUM_SPARSE), dtype=np.int64)
    for j, c in enumerate(SPARSE_NAMES):
        col = df[c].fillna("").to_numpy().astype("S9")
        ids, bad = _hex_to_int(col)
        fail(bad, f"column {c}: not 8 hex digits")
        sparse[:, j] = ids
    if errors and not skip_bad_lines:
        i, what = min(errors)
        raise CriteoFormatError(f"{path}:{rows_line[i]}: {what}")
    if bad_row.any():
        keep = ~bad_row
        labels, dense, sparse = labels[keep], dense[keep], sparse[keep]
        skipped += int(bad_row.sum())
    return Chunk(labels, dense, sparse, int(rows_line[0]), skipped)
