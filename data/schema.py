"""Declared column schemas: CTR files other than Criteo's fixed 40 columns (Avazu, or any
delimited file described in JSON) read into the same rows as :mod:`data.criteo`.

A schema names every column of a labelled file, in order, and gives each one role:
``label`` (0 or 1), ``dense`` (numbers), ``sparse`` (categorical: any string), ``time``
(``yymmddhh``, as Avazu's ``hour``: it becomes two categorical features, ``<col>_hour``
0-23 and ``<col>_weekday`` 0-6 with Monday 0) or ``ignore`` (e.g. a row id).  Files may
hold the label column or not (unlabelled test files); with ``header`` their first line
must be the column names.

The language of a schema file (strict: a line that is not in it is an error naming
file, line and column, or is skipped and counted with ``skip_bad_lines``):
- exactly one field per column, separated by ``delimiter``, no quoting;
- label: ``0`` or ``1``;
- dense: empty (read as 0) or a number whose float32 value is finite (``1e39``, ``nan``,
  ``inf`` are errors); the models see log(1 + max(x, 0)) as for Criteo;
- sparse: empty -> ``MISSING_ID`` (-1), else the string's 64-bit hash (pandas' SipHash
  with a fixed key) with the top bit cleared, so ids are >= 0 and stable across runs;
- time: 8 digits ``yymmddhh`` of a real date (20yy) and hour.

Schema JSON: ``{"name", "columns", "label", "dense", "sparse", "time", "ignore",
"delimiter", "header"}``; every column in exactly one role, unknown keys refused.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data.criteo import DENSE_NAMES, MISSING_ID, SPARSE_NAMES, Chunk, CriteoFormatError, _blocks, _open, read_criteo

_HASH_KEY = "rectables-ids-01"  # 16 bytes: the SipHash key of categorical strings
_TOP = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class Schema:
    """Roles of a delimited file's columns; ``features`` are the categorical features
    in the order of the sparse arrays [R, F] (sparse columns, then each time column's
    hour and weekday); ``dense`` the order of the dense arrays [R, Nd]."""

    name: str
    columns: list[str]
    label: str | None = None
    dense: list[str] = field(default_factory=list)
    sparse: list[str] = field(default_factory=list)
    time: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    delimiter: str = ","
    header: bool = True

    def __post_init__(self) -> None:
        roles = [*([self.label] if self.label else []), *self.dense, *self.sparse, *self.time, *self.ignore]
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"schema {self.name!r}: column names repeat: {self.columns}")
        if sorted(roles) != sorted(self.columns):
            extra, missing = set(roles) - set(self.columns), set(self.columns) - set(roles)
            twice = sorted({c for c in roles if roles.count(c) > 1})
            raise ValueError(f"schema {self.name!r}: every column needs exactly one role (label, dense, sparse, "
                             f"time, ignore); without a role: {sorted(missing)}; not a column: {sorted(extra)}; "
                             f"in two roles: {twice}")
        if not self.features:
            raise ValueError(f"schema {self.name!r} has no categorical (sparse or time) column")
        if len(self.delimiter) != 1 or self.delimiter in "\r\n\"":
            raise ValueError(f"schema {self.name!r}: delimiter must be one character other than a quote or newline, "
                             f"got {self.delimiter!r}")

    @property
    def features(self) -> list[str]:
        return [*self.sparse, *(f"{c}_{part}" for c in self.time for part in ("hour", "weekday"))]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ValueError(f"schema: unknown keys {sorted(set(d) - known)}; known: {sorted(known)}")
        if "name" not in d or "columns" not in d:
            raise ValueError("schema: 'name' and 'columns' are required")
        return cls(**d)


CRITEO = Schema("criteo", ["label", *DENSE_NAMES, *SPARSE_NAMES], label="label", dense=DENSE_NAMES,
                sparse=SPARSE_NAMES, delimiter="\t", header=False)
_AVAZU_COLS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
               "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
               "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
AVAZU = Schema("avazu", _AVAZU_COLS, label="click", sparse=_AVAZU_COLS[3:], time=["hour"], ignore=["id"])
SCHEMAS = {"criteo": CRITEO, "avazu": AVAZU}


def get_schema(spec: str | dict | Schema) -> Schema:
    """A schema by name (``criteo``, ``avazu``), from a JSON file path, or from its dict."""
    if isinstance(spec, Schema):
        return spec
    if isinstance(spec, dict):
        return Schema.from_dict(spec)
    if spec in SCHEMAS:
        return SCHEMAS[spec]
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"schema {spec!r} is neither a known format {sorted(SCHEMAS)} nor a JSON file")
    return Schema.from_dict(json.loads(p.read_text()))


def is_labelled(path: Path, schema: Schema) -> bool:
    """Whether ``path`` holds the label column: from its header, else its field count."""
    with _open(path) as fh:
        first = fh.readline().rstrip(b"\r\n").decode("utf-8", "replace")
    fields = first.split(schema.delimiter)
    unlabelled = [c for c in schema.columns if c != schema.label]
    if schema.header:
        if fields == schema.columns and schema.label:
            return True
        if fields == unlabelled:
            return False
        raise CriteoFormatError(f"{path}: line 1 is not the header of schema {schema.name!r}: expected "
                                f"{schema.delimiter.join(schema.columns)!r} (or without {schema.label!r}), "
                                f"got {first[:200]!r}")
    if len(fields) == len(schema.columns) and schema.label:
        return True
    if len(fields) == len(unlabelled):
        return False
    raise CriteoFormatError(f"{path}: line 1 has {len(fields)} fields; schema {schema.name!r} has "
                            f"{len(schema.columns)} (or {len(unlabelled)} without the label)")


def read_rows(path, schema: Schema, skip_bad_lines: bool = False, labelled: bool = True,
              chunk_rows: int = 1 << 18) -> Iterator[Chunk]:
    """Chunks of ``path`` under ``schema``: labels [R], dense [R, Nd] (raw), sparse [R, F]."""
    path = Path(path)
    if schema == CRITEO:
        yield from read_criteo(path, skip_bad_lines=skip_bad_lines, labelled=labelled, chunk_rows=chunk_rows)
        return
    cols = schema.columns if labelled else [c for c in schema.columns if c != schema.label]
    if labelled and not schema.label:
        raise ValueError(f"schema {schema.name!r} has no label column")
    line = 1
    for block in _blocks(path, max(1 << 16, chunk_rows * 200)):
        data = bytes(block)
        if line == 1 and schema.header:
            cut = data.index(b"\n") + 1
            if is_labelled(path, schema) != labelled:  # (also checks the header)
                raise CriteoFormatError(f"{path}: its header {'lacks' if labelled else 'has'} the label column "
                                        f"{schema.label!r}, but the file was read as {'un' if not labelled else ''}"
                                        f"labelled")
            data, line = data[cut:], 2
        if data:
            yield _parse(data, path, line, cols, schema, skip_bad_lines, labelled)
            line += data.count(b"\n")


def _parse(data: bytes, path: Path, first: int, cols: list[str], s: Schema, skip: bool, labelled: bool) -> Chunk:
    import pandas as pd

    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    seps = np.cumsum(buf == ord(s.delimiter))[ends]
    nfields = np.diff(seps, prepend=0) + 1
    bad = nfields != len(cols)  # [R] lines to report or skip, and why
    why = np.where(bad, "has a wrong number of fields", "").astype(object)
    keep = np.flatnonzero(~bad)
    if bad.any():  # parse the good lines only: keep the bytes whose line is good
        line_of = np.concatenate([[0], np.cumsum(buf[:-1] == 10)])
        data = buf[~bad[line_of]].tobytes()
    try:
        df = pd.read_csv(io.BytesIO(data), sep=s.delimiter, header=None, names=cols, dtype=str, na_filter=False,
                         quoting=3, skip_blank_lines=False, engine="c", encoding="utf-8") if len(keep) else None
    except (ValueError, pd.errors.ParserError) as e:
        raise CriteoFormatError(f"{path}: lines {first}-{first + len(ends) - 1} cannot be read ({e})") from e
    n = len(keep)
    labels, dense = np.zeros(n, np.float32), np.zeros((n, len(s.dense)), np.float32)
    sparse = np.empty((n, len(s.features)), np.int64)
    col_bad = np.zeros(n, dtype=object)  # first bad column of each kept line, or 0
    def flag(mask, what):
        new = mask & (col_bad == 0)
        col_bad[new] = what
    if n:
        if labelled:
            lab = df[s.label].to_numpy()
            flag((lab != "0") & (lab != "1"), f"column {s.label!r} (label) is not 0 or 1")
            labels[:] = lab == "1"
        for j, c in enumerate(s.dense):
            v = df[c].to_numpy()
            x = pd.to_numeric(pd.Series(np.where(v == "", "0", v)), errors="coerce").to_numpy(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                x32 = x.astype(np.float32)
            flag(~np.isfinite(x32), f"column {c!r} (dense) is not a finite float32 number")
            dense[:, j] = np.where(np.isfinite(x32), x32, 0)
        for j, c in enumerate(s.sparse):
            v = df[c].to_numpy(dtype=object)
            h = (pd.util.hash_array(v, hash_key=_HASH_KEY, categorize=True) & _TOP).view(np.int64)
            sparse[:, j] = np.where(v == "", MISSING_ID, h)
        for j, c in enumerate(s.time):
            hour, weekday, ok = _yymmddhh(df[c].to_numpy(dtype=object))
            flag(~ok, f"column {c!r} (time) is not yymmddhh")
            k = len(s.sparse) + 2 * j
            sparse[:, k], sparse[:, k + 1] = hour, weekday
    bad_kept = col_bad != 0
    if bad.any() or bad_kept.any():
        lines = first + np.arange(len(ends))
        why[keep[bad_kept]] = col_bad[bad_kept]
        wrong = np.flatnonzero(why != "")
        if not skip:
            i = wrong[0]
            raise CriteoFormatError(f"{path}:{lines[i]}: {why[i]} (schema {s.name!r}: {len(cols)} fields "
                                    f"{s.delimiter!r}-separated); pass --skip-bad-lines to skip such lines")
        ok = ~bad_kept
        labels, dense, sparse = labels[ok], dense[ok], sparse[ok]
    return Chunk(labels, dense, sparse, first, int(bad.sum() + bad_kept.sum()))


def _yymmddhh(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hour 0-23, weekday 0-6 with Monday 0, valid) of ``yymmddhh`` strings [R]; each
    distinct string is parsed once (a day of data has 24)."""
    uniq, inv = np.unique(v.astype(str), return_inverse=True)
    parts = np.zeros((len(uniq), 3), np.int64)  # hour, weekday, valid
    for i, x in enumerate(uniq):
        if len(x) == 8 and x.isascii() and x.isdigit() and int(x[6:]) < 24:
            text = f"20{x[:2]}-{x[2:4]}-{x[4:6]}"
            try:
                day = np.datetime64(text, "D")
            except ValueError:
                continue
            if str(day) == text:
                parts[i] = int(x[6:]), (day.astype(np.int64) + 3) % 7, 1  # 1970-01-01 was a Thursday
    hour, weekday, ok = parts[inv.reshape(-1)].T
    return hour, weekday, ok.astype(bool)


def schema_of(meta: dict) -> Schema:
    """The schema a dataset was written with (datasets from before schemas: Criteo)."""
    return Schema.from_dict(meta["schema"]) if "schema" in meta else CRITEO
