"""Streaming reader of Criteo-format TSV (label, I1..I13, C1..C26; plain or .gz; no header).

The language (documented, tested; :func:`parse_line` is its reference):
- Lines end in ``\n``; one ``\r`` right before it is dropped (CRLF files).  Fields are
  separated by tabs: 40 of them, or 39 without the label.
- label: ``0`` or ``1``.
- I columns: empty (read as 0) or an integer ``[+-]?[0-9]+`` within int64, stored as the
  nearest float32 (so always finite); ``dense_transform`` is log(1 + max(x, 0)).
  Anything else (``1.5``, ``1e39``, ``nan``, ``NA``, ``inf``, spaces) is malformed.
- C columns: empty -> ``MISSING_ID`` (-1), which can never collide with a real id, or
  exactly 8 hex digits (either case) -> int64 raw id in [0, 2^32).
- A malformed line (also an empty one, or one with a stray ``\r`` or non-ASCII byte)
  raises ``CriteoFormatError`` naming file, line and column, unless ``skip_bad_lines``
  is set: then it is dropped and counted.  A truncated or corrupt gzip is an error
  naming the file.

Speed: each block of lines is parsed by a small C extension (``_criteo_parse.c``), one
part per core, straight into the output arrays.  It stops at a line that is not well
formed; :func:`parse_line` then names the column (or the line is skipped) and the C
parser goes on after it.  Without the extension every line takes :func:`parse_line`.
"""
from __future__ import annotations

import functools
import gzip
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

try:  # built by `pip install -e .` (setup.py); without it every line takes parse_line
    from data import _criteo_parse
except ImportError:  # pragma: no cover - depends on the build
    _criteo_parse = None

NUM_DENSE, NUM_SPARSE = 13, 26
_THREADS = max(1, min(4, os.cpu_count() or 1))  # parts per block, parsed in parallel
DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
COLUMNS = ["label", *DENSE_NAMES, *SPARSE_NAMES]
MISSING_ID = -1
_INT = re.compile(rb"[+-]?[0-9]+")
_HEX8 = re.compile(rb"[0-9a-fA-F]{8}")
_INT64 = (-(1 << 63), (1 << 63) - 1)


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
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise CriteoFormatError(f"{path}: truncated or corrupt gzip ({e}); the file needs to be "
                                        "downloaded or written again") from e
            if not n:
                break
            end = len(rest) + n
            cut = buf.rfind(b"\n", 0, end) + 1
            rest = bytes(buf[cut:end])
            if cut:
                yield memoryview(buf)[:cut]
    if rest:
        yield memoryview(rest + b"\n")


class BadLine(ValueError):
    """A line that is not in the language; the message names the column."""


def _show(field: bytes) -> str:
    return repr(field[:24] + (b"..." if len(field) > 24 else b""))


def parse_line(line: bytes, labelled: bool = True) -> tuple[float, list[float], list[int]]:
    """The reference parser: one line (without its ``\n``) -> (label, 13 dense, 26 ids).

    Raises :class:`BadLine` naming the column.  The C fast path accepts exactly the same
    lines and gives the same values (tested on mutants)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    fields = line.split(b"\t")
    ncol = len(COLUMNS) - (0 if labelled else 1)
    if len(fields) != ncol:
        raise BadLine(f"expected {ncol} tab-separated columns, found {len(fields)}")
    label = 0.0
    if labelled:
        f, fields = fields[0], fields[1:]
        if f not in (b"0", b"1"):
            raise BadLine(f"label must be 0 or 1, got {_show(f)}")
        label = float(f)
    dense = []
    for name, f in zip(DENSE_NAMES, fields):
        if not f:
            dense.append(0.0)
            continue
        if not _INT.fullmatch(f):
            raise BadLine(f"column {name}: not an integer: {_show(f)}")
        v = int(f)
        if not _INT64[0] <= v <= _INT64[1]:
            raise BadLine(f"column {name}: integer outside int64: {_show(f)}")
        dense.append(float(np.float32(float(v))))
    sparse = []
    for name, f in zip(SPARSE_NAMES, fields[NUM_DENSE:]):
        if not f:
            sparse.append(MISSING_ID)
        elif _HEX8.fullmatch(f):
            sparse.append(int(f, 16))
        else:
            raise BadLine(f"column {name}: not 8 hex digits: {_show(f)}")
    return label, dense, sparse


def read_criteo(
    path: str | Path, chunk_rows: int = 200_000, skip_bad_lines: bool = False, labelled: bool = True
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s of about ``chunk_rows`` rows; never the whole file in memory."""
    path = Path(path)
    line = 1
    for block in _blocks(path, chunk_rows * 240):
        chunk, lines = _parse_block(block, line, path, labelled, skip_bad_lines)
        line += lines
        yield chunk


def _parse_block(block, line: int, path: Path, labelled: bool, skip: bool) -> tuple[Chunk, int]:
    """A block of whole lines -> (chunk, lines in the block), parts parsed in parallel."""
    parts = _split_lines(block, _THREADS if _criteo_parse is not None else 1)
    counts = [_count_lines(p) for p in parts]
    starts = np.cumsum([0, *counts])
    n = int(starts[-1])
    labels = np.zeros(n, dtype=np.float32)
    dense = np.empty((n, NUM_DENSE), dtype=np.float32)
    sparse = np.empty((n, NUM_SPARSE), dtype=np.int64)

    def parse(i: int) -> int:
        s, e = starts[i], starts[i + 1]
        return _parse_part(parts[i], line + int(s), path, labelled, skip, labels[s:e], dense[s:e], sparse[s:e])

    rows = list(_pool().map(parse, range(len(parts)))) if len(parts) > 1 else [parse(i) for i in range(len(parts))]
    if rows != counts:  # skipped lines: keep each part's parsed prefix
        keep = np.concatenate([np.arange(s, s + r) for s, r in zip(starts, rows)]).astype(np.int64)
        labels, dense, sparse = labels[keep], dense[keep], sparse[keep]
    return Chunk(labels, dense, sparse, line, n - sum(rows)), n


def _count_lines(part) -> int:
    return _criteo_parse.count_lines(part) if _criteo_parse is not None else bytes(part).count(b"\n")


def _parse_part(part, line: int, path: Path, labelled: bool, skip: bool, labels, dense, sparse) -> int:
    """Whole lines of ``part`` (first one is ``line``) into the arrays; returns rows written.
    The C parser runs up to a bad line, :func:`parse_line` takes that line, and so on."""
    rows = pos = 0
    data = None  # bytes of the part, made once a line has to be read in Python
    while pos < len(part):
        if _criteo_parse is not None:
            n, bad = _criteo_parse.parse(part[pos:], labelled, labels[rows:], dense[rows:], sparse[rows:])
            rows, line = rows + n, line + n
            if bad < 0:
                break
            pos += bad
        data = data if data is not None else bytes(part)
        end = data.index(b"\n", pos)
        try:
            labels[rows], dense[rows], sparse[rows] = parse_line(data[pos:end], labelled)
            rows += 1
        except BadLine as e:
            if not skip:
                raise CriteoFormatError(f"{path}:{line}: {e}") from None
        line, pos = line + 1, end + 1
    return rows


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
