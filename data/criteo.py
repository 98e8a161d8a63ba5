"""Streaming reader of Criteo-format TSV (label, I1..I13, C1..C26; plain or .gz; no header).

Policy (documented, tested):
- C columns: 8 hex digits -> int64 raw id in [0, 2^32); empty -> ``MISSING_ID`` (-1),
  which can never collide with a real id.
- I columns: integers; empty -> 0 (a missing integer and a 0 read the same after
  ``dense_transform``); the transform is log(1 + max(x, 0)).
- A malformed line (wrong column count, non-hex id, non-integer dense value, label
  not 0/1, empty line) raises ``CriteoFormatError`` naming file, line and column,
  unless ``skip_bad_lines`` is set: then it is dropped and counted.

Speed: each block of lines is parsed by pyarrow's multi-threaded CSV reader and the
ids decoded word-wide in numpy; a block in which anything is off is parsed again by
the strict pandas path, which finds and names the line.
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

    Each block of whole lines is parsed by pyarrow's multi-threaded CSV reader; a block
    with anything unexpected in it is parsed again by the strict path, which names the
    line and column (or drops and counts bad lines with ``skip_bad_lines``).
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


def _fast_block(block: bytes, line: int, labelled: bool) -> Chunk | None:
    """pyarrow parse of a clean block; None if any line is not well formed."""
    import pyarrow as pa
    from pyarrow import csv

    names = COLUMNS if labelled else COLUMNS[1:]
    types = {**{c: pa.int64() for c in names if c not in SPARSE_NAMES}, **{c: pa.binary() for c in SPARSE_NAMES}}
    try:
        table = csv.read_csv(
            pa.BufferReader(block),
            read_options=csv.ReadOptions(column_names=names, block_size=1 << 22),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                           escape_char=False, ignore_empty_lines=False),
            convert_options=csv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    n = table.num_rows  # one row per line: empty lines are errors, not skipped
    labels = np.zeros(n, dtype=np.float32)
    if labelled:
        lab = table.column("label")
        if lab.null_count:
            return None
        lab = lab.to_numpy()
        if ((lab != 0) & (lab != 1)).any():
            return None
        labels = lab.astype(np.float32)
    dense = np.empty((n, NUM_DENSE), dtype=np.float32)
    for j, c in enumerate(DENSE_NAMES):
        dense[:, j] = table.column(c).fill_null(0).to_numpy()
    sparse_t = np.empty((NUM_SPARSE, n), dtype=np.int64)  # column by column, transposed once
    ok = list(_pool().map(lambda j: _hex_column(table.column(SPARSE_NAMES[j]), sparse_t[j]), range(NUM_SPARSE)))
    return Chunk(labels, dense, np.ascontiguousarray(sparse_t.T), line) if all(ok) else None


def _pool() -> ThreadPoolExecutor:
    """Threads for the hex decode (numpy releases the GIL); one pool per process, since a
    forked child inherits the pool but not its threads."""
    return _pool_of(os.getpid())


@functools.cache
def _pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))


def _hex_column(column, out: np.ndarray) -> bool:
    """pyarrow binary column [R] of 8-hex-digit or empty values -> int64 ids written to
    ``out`` [R] (empty -> MISSING_ID); False if some value is anything else."""
    start = 0
    for col in column.chunks:
        _, offsets, data = col.buffers()
        off = np.frombuffer(offsets, dtype=np.int32, count=len(col) + 1, offset=col.offset * 4)
        width = np.diff(off)
        dst = out[start : start + len(col)]
        start += len(col)
        if (width == 8).all():
            words = np.frombuffer(data, dtype="<u8", count=len(col), offset=int(off[0]))
            if not _decode_hex_words(words, dst):
                return False
            continue
        full = width == 8
        if not (full | (width == 0)).all():
            return False
        dst[:] = MISSING_ID
        if full.any():
            words = np.frombuffer(data, dtype="<u8", count=int(full.sum()), offset=int(off[0]))
            ids = np.empty(len(words), dtype=np.int64)
            if not _decode_hex_words(words, ids):
                return False
            dst[full] = ids
    return True


def _k(byte: int) -> np.uint64:
    """``byte`` repeated in all 8 bytes of a word."""
    return np.uint64(byte * 0x0101010101010101)


_HI, _LO, _X20, _NIB = _k(0x80), _k(0x01), _k(0x20), _k(0x0F)
_DIGIT = (_k(0x80 - 0x30), _k(0x7F - 0x39))  # x + a has the top bit iff byte >= lo; x + b iff byte > hi
_LETTER = (_k(0x80 - 0x61), _k(0x7F - 0x66))


def _byte_in(x: np.ndarray, bounds: tuple, out: np.ndarray, scratch: np.ndarray) -> None:
    """Top bit of each byte of ``out``: byte of x (< 0x80) within the range ``bounds``."""
    np.add(x, bounds[1], out=scratch)
    np.add(x, bounds[0], out=out)
    np.bitwise_not(scratch, out=scratch)
    np.bitwise_and(out, scratch, out=out)


def _decode_hex_words(x: np.ndarray, out: np.ndarray) -> bool:
    """Words [n] of 8 ASCII hex digits (first digit in the lowest byte) -> values int64
    [n] in ``out``; False if some byte is not a hex digit.  Word-wide byte arithmetic,
    in place (no temporaries beyond three scratch words per value)."""
    a, b, t = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    if np.bitwise_and(x, _HI, out=t).any():  # bytes >= 0x80 (would carry below)
        return False
    _byte_in(x, _DIGIT, out=a, scratch=t)  # 0-9
    np.bitwise_or(x, _X20, out=b)  # a-f, A-F
    _byte_in(b, _LETTER, out=b, scratch=t)
    np.bitwise_or(a, b, out=a)
    np.bitwise_and(a, _HI, out=a)
    if not (a == _HI).all():
        return False
    np.right_shift(x, np.uint64(6), out=t)  # nibble = low 4 bits, + 9 for letters
    np.bitwise_and(t, _LO, out=t)
    np.multiply(t, np.uint64(9), out=t)
    np.bitwise_and(x, _NIB, out=a)
    np.add(a, t, out=a)
    for shift, mask in ((4, 0x00FF00FF00FF00FF), (8, 0x0000FFFF0000FFFF), (16, 0xFFFFFFFF)):
        np.left_shift(a, np.uint64(shift), out=t)  # pair neighbours: first one high
        np.right_shift(a, np.uint64(2 * shift), out=a)
        np.bitwise_or(a, t, out=a)
        np.bitwise_and(a, np.uint64(mask), out=a)
    out[:] = a.view(np.int64)
    return True


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
