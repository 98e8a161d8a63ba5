"""Streaming reader of Criteo-format TSV (label, I1..I13, C1..C26; plain or .gz; no header).

Policy (documented, tested):
- C columns: 8 hex digits -> int64 raw id in [0, 2^32); empty -> ``MISSING_ID`` (-1),
  which can never collide with a real id.
- I columns: integers; empty -> 0 (a missing integer and a 0 read the same after
  ``dense_transform``); the transform is log(1 + max(x, 0)).
- A malformed line (wrong column count, non-hex id, non-integer dense value, label
  not 0/1, empty line) raises ``CriteoFormatError`` naming file, line and column,
  unless ``skip_bad_lines`` is set: then it is dropped and counted.

Speed: each block of lines is parsed by a small C extension (``_criteo_parse.c``), one
part per core, straight into the output arrays; a block in which anything is off is
parsed again by the strict pandas path, which finds and names the line.
"""
from __future__ import annotations

import functools
import gzip
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

try:  # built by `pip install -e .` (setup.py); without it every block takes the strict path
    from data import _criteo_parse
except ImportError:  # pragma: no cover - depends on the build
    _criteo_parse = None

NUM_DENSE, NUM_SPARSE = 13, 26
_THREADS = max(1, min(4, os.cpu_count() or 1))  # parts per block, parsed in parallel
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


def _blocks(path: Path, block_bytes: int) -> Iterator[memoryview]:
    """Whole lines, about ``block_bytes`` at a time; a missing final newline is added.
    Each block is a view of one reused buffer: valid until the next block is asked for."""
    rest = b""
    buf = bytearray(block_bytes)
    with _open(path) as f:
        while True:
            if len(rest) + block_bytes > len(buf):  # a line longer than a block
                buf = bytearray(len(rest) + block_bytes)
            buf[: len(rest)] = rest
            try:
                n = f.readinto(memoryview(buf)[len(rest) : len(rest) + block_bytes])
            except (EOFError, gzip.BadGzipFile) as e:
                raise CriteoFormatError(f"{path}: truncated or corrupt gzip ({e})") from e
            if not n:
                break
            end = len(rest) + n
            cut = buf.rfind(b"\n", 0, end) + 1
            rest = bytes(buf[cut:end])
            if cut:
                yield memoryview(buf)[:cut]
    if rest:
        yield memoryview(rest + b"\n")


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
    """Yield :class:`Chunk` s of about ``chunk_rows`` rows; never the whole file in memory.

    Each block of whole lines goes through the C fast path; a block with anything
    unexpected in it is parsed again by the strict path, which names the line and column
    (or drops and counts bad lines with ``skip_bad_lines``).
    """
    path = Path(path)
    line = 1
    for block in _blocks(path, chunk_rows * 240):
        chunk = _fast_block(block, line, labelled)
        lines = len(chunk.labels) if chunk is not None else None
        if chunk is None:
            chunk, lines = _strict_block(block, line, path, labelled, skip_bad_lines)
        line += lines
        yield chunk


def _fast_block(block, line: int, labelled: bool) -> Chunk | None:
    """C parse of a block of well-formed lines (``data/_criteo_parse.c``), one part per
    thread; None if some line is not well formed (or the extension is not built)."""
    if _criteo_parse is None:
        return None
    parts = _split_lines(block, _THREADS)
    counts = [_criteo_parse.count_lines(p) for p in parts]
    starts = np.cumsum([0, *counts])
    n = int(starts[-1])
    labels = np.zeros(n, dtype=np.float32)
    dense = np.empty((n, NUM_DENSE), dtype=np.float32)
    sparse = np.empty((n, NUM_SPARSE), dtype=np.int64)

    def parse(i: int) -> int:
        s, e = starts[i], starts[i + 1]
        return _criteo_parse.parse(parts[i], labelled, labels[s:e], dense[s:e], sparse[s:e])

    done = list(_pool().map(parse, range(len(parts)))) if len(parts) > 1 else [parse(0)]
    return Chunk(labels, dense, sparse, line) if done == counts else None


def _split_lines(block, k: int) -> list:
    """``block`` cut into up to k parts of whole lines, about equal in size."""
    cuts, data = [0], np.frombuffer(block, dtype=np.uint8)
    for i in range(1, k):
        at = max(cuts[-1], len(data) * i // k)
        nl = np.flatnonzero(data[at : at + (1 << 20)] == 10)  # next line end within 1 MB
        if nl.size and at + nl[0] + 1 < len(data):
            cuts.append(at + int(nl[0]) + 1)
    cuts.append(len(data))
    return [block[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _pool() -> ThreadPoolExecutor:
    """Parsing threads (the C parser releases the GIL); one pool per process, since a
    forked child inherits the pool but not its threads."""
    return _pool_of(os.getpid())


@functools.cache
def _pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS)


def _strict_block(block, line: int, path: Path, labelled: bool, skip_bad_lines: bool) -> tuple[Chunk, int]:
    """Column counts by tab positions, then pandas; names the first bad line.  Returns
    (chunk, lines in the block)."""
    ncol = len(COLUMNS) - (0 if labelled else 1)
    names = COLUMNS if labelled else COLUMNS[1:]
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
    if not len(block):
        return Chunk(np.zeros(0, np.float32), np.zeros((0, NUM_DENSE), np.float32),
                     np.zeros((0, NUM_SPARSE), np.int64), line, skipped), len(ends)
    data = io.BytesIO(block)
    common = dict(sep="\t", header=None, names=names, engine="c", quoting=3)
    try:  # typed columns
        df = pd.read_csv(data, dtype={**{c: "float64" for c in names[: ncol - NUM_SPARSE]},
                                      **{c: object for c in SPARSE_NAMES}}, **common)
    except ValueError:  # a non-numeric value somewhere: all text, checked column by column
        data.seek(0)
        df = pd.read_csv(data, dtype=object, keep_default_na=False, na_values=[""], **common)
    return _convert(df, path, rows_line, labelled, skip_bad_lines, skipped), len(ends)


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
