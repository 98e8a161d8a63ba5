"""Deterministic generator of Criteo-format data with a planted signal.

Rows have the 26 Criteo Kaggle cardinalities (times ``scale``), Zipf(1.1) category
ranks, Criteo's missing rates, and a label drawn from a known logistic model:

    logit = bias + sum_f a_f * w_f(id_f) + sum_(f,g) c * w'_f(id_f) * w'_g(id_g) + sum_j b_j * z_j(I_j)

with w, w' standard normal per (feature, id) derived from a hash (nothing stored),
z_j the standardised log1p of dense column j.  The Bayes AUC (AUC of the true
probabilities) is the ceiling any model can reach on the data.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd

from data.criteo import DENSE_NAMES, NUM_DENSE
from rectables.presets import CRITEO_KAGGLE

DENSE_MISSING = [0.46, 0.0, 0.21, 0.22, 0.03, 0.24, 0.04, 0.0, 0.04, 0.46, 0.04, 0.77, 0.22]
SPARSE_MISSING = {3: .03, 4: .03, 6: .13, 12: .03, 16: .03, 19: .44, 20: .44, 21: .03, 22: .78, 24: .03, 25: .44, 26: .44}
INFORMATIVE = {3: 0.6, 4: 0.5, 12: 0.55, 16: 0.45, 21: 0.5, 24: 0.4, 10: 0.3, 2: 0.3, 7: 0.25, 13: 0.25}
CROSSES = [(3, 12), (4, 16), (1, 21)]
DENSE_WEIGHTS = {1: 0.3, 5: -0.2, 8: 0.25, 11: 0.2}
BIAS, CROSS_WEIGHT = -1.25, 0.4
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _normal(rank: np.ndarray, salt: int) -> np.ndarray:
    """A standard normal per (rank, salt), from two hashed uniforms (Box-Muller)."""
    h1 = _mix(rank.astype(np.uint64) ^ _mix(np.array([salt], dtype=np.uint64)))
    h2 = _mix(h1 ^ _GOLD)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def cardinalities(scale: float) -> list[int]:
    return [max(2, round(n * scale)) for n in CRITEO_KAGGLE]


def _chunk(rng: np.random.Generator, n: int, cards: list[int]):
    ranks = np.stack([(rng.zipf(1.1, n) - 1) % c for c in cards], 1)  # [n, 26]
    miss_s = np.stack([rng.random(n) < SPARSE_MISSING.get(f + 1, 0.0) for f in range(26)], 1)
    dense = np.floor(rng.lognormal(1.0, 1.5, (n, NUM_DENSE))).astype(np.int64)
    dense[:, 1] -= 2  # I2 goes down to -2, as in Criteo
    miss_d = rng.random((n, NUM_DENSE)) < np.array(DENSE_MISSING)
    logit = np.full(n, BIAS)
    for f, a in INFORMATIVE.items():
        logit += np.where(miss_s[:, f - 1], 0.0, a * _normal(ranks[:, f - 1], f))
    for f, g in CROSSES:
        both = ~(miss_s[:, f - 1] | miss_s[:, g - 1])
        logit += np.where(both, CROSS_WEIGHT * _normal(ranks[:, f - 1], 100 + f) * _normal(ranks[:, g - 1], 100 + g), 0.0)
    for j, b in DENSE_WEIGHTS.items():
        z = (np.log1p(np.maximum(dense[:, j - 1], 0)) - 1.0) / 1.2
        logit += np.where(miss_d[:, j - 1], 0.0, b * z)
    p = 1 / (1 + np.exp(-logit))
    labels = (rng.random(n) < p).astype(np.int64)
    return ranks, miss_s, dense, miss_d, p, labels


def _hex_ids(rank: np.ndarray, f: int, missing: np.ndarray) -> np.ndarray:
    """8-hex raw ids (distinct per feature), '' where missing."""
    v = (_mix(rank.astype(np.uint64) ^ _mix(np.array([f + 1000], dtype=np.uint64))) & np.uint64(0xFFFFFFFF))
    digits = np.array(list(b"0123456789abcdef"), dtype=np.uint8)
    nib = (v[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)) & np.uint64(15)
    out = digits[nib.astype(np.int64)].view("S8").ravel().astype("U8")
    out[missing] = ""
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (ties counted half)."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ranks = pd.Series(s).rank(method="average").to_numpy()
    pos = y.sum()
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos)))


def synth(rows: int, out: str | Path, seed: int = 0, scale: float = 1.0, chunk_rows: int = 250_000) -> dict:
    """Write ``rows`` Criteo-format rows to ``out`` (.tsv or .tsv.gz); returns facts incl. Bayes AUC.
    The file is written under a temporary name and renamed when whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cards = cardinalities(scale)
    probs, labels_all = [], []
    opener = gzip.open if out.suffix == ".gz" else open
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with opener(tmp, "wt", newline="") as fh:
        done = 0
        while done < rows:
            n = min(chunk_rows, rows - done)
            ranks, miss_s, dense, miss_d, p, labels = _chunk(rng, n, cards)
            cols = {"label": labels}
            for j, name in enumerate(DENSE_NAMES):
                cols[name] = pd.array(np.where(miss_d[:, j], 0, dense[:, j]), dtype="Int64")
                cols[name][miss_d[:, j]] = pd.NA
            for f in range(26):
                cols[f"C{f + 1}"] = _hex_ids(ranks[:, f], f, miss_s[:, f])
            pd.DataFrame(cols).to_csv(fh, sep="\t", header=False, index=False, na_rep="")
            probs.append(p)
            labels_all.append(labels)
            done += n
    os.replace(tmp, out)
    p, y = np.concatenate(probs), np.concatenate(labels_all)
    return {"rows": rows, "seed": seed, "scale": scale, "cardinalities": cards,
            "positive_rate": float(y.mean()), "bayes_auc": auc(p, y), "path": str(out)}
