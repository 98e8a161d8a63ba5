"""Behaviour sequences as CTR samples for DIN (Zhou et al., KDD 2018): MovieLens-100k
(each user's ratings by time, the movie's first genre as its category) and Amazon Beauty
(BERT4Rec's preprocessing: lines already in time order, no categories).

Protocol: in a user's sequence s_1 .. s_n, target s_t has the history s_1 .. s_{t-1} (at
most ``max_history`` latest items).  Targets t = n - 1 form the validation split, t = n the
test split, 2 <= t <= n - 2 the training split.  Every positive (label 1) comes with one
negative (label 0): the same history and an item drawn uniformly among those the user
never interacted with.  Everything is drawn once, from ``seed``.

A batch is a KeyedJaggedTensor of stride 2B with the feature ``item`` (and ``cat``): bags
0..B-1 hold the B targets (one id each), bags B..2B-1 the B histories.  Target and history
are one feature, so they read one table and an id reads the same row in both, whatever
the method (a table's features may hash an id apart).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data.loader import Batch, prefetched


@dataclass
class Sequences:
    """Every user's items in time order: user u's are ``items[offsets[u]:offsets[u + 1]]``
    (ids 0..num_items-1); ``categories`` [num_items] or None."""

    offsets: np.ndarray
    items: np.ndarray
    num_items: int
    categories: np.ndarray | None = None

    @property
    def num_categories(self) -> int:
        return 0 if self.categories is None else int(self.categories.max()) + 1


def load_movielens(folder: str | Path) -> Sequences:
    folder = Path(folder)
    r = pd.read_csv(folder / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    r = r.sort_values(["user", "ts", "item"], kind="stable")
    genres = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1").iloc[:, 5:24].to_numpy()
    if genres.shape[1] != 19 or r["item"].max() > len(genres):
        raise ValueError(f"{folder}: u.item does not have 19 genre flags for every rated movie")
    items, codes = np.unique(r["item"].to_numpy(), return_inverse=True)
    cats = genres[items - 1].argmax(1).astype(np.int64)  # first genre flag; 0 = "unknown"
    return _from_pairs(r["user"].to_numpy(), codes.astype(np.int64), len(items), cats)


def load_beauty(folder: str | Path) -> Sequences:
    path = Path(folder) / "beauty.txt.gz"
    r = pd.read_csv(path, sep=" ", names=["user", "item"], dtype=np.int64)
    if (np.diff(r["user"].to_numpy()) < 0).any():
        raise ValueError(f"{path}: a user's lines are not contiguous and ascending")
    items, codes = np.unique(r["item"].to_numpy(), return_inverse=True)
    return _from_pairs(r["user"].to_numpy(), codes.astype(np.int64), len(items), None)


def _from_pairs(users: np.ndarray, items: np.ndarray, num_items: int, cats) -> Sequences:
    """users [E] (contiguous runs, in order), items [E] in time order within each run."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return Sequences(np.r_[starts, len(users)].astype(np.int64), items, num_items, cats)


LOADERS = {"movielens": load_movielens, "beauty": load_beauty}


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[j], starts[j] + lengths[j]) as one index array."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


@dataclass
class Samples:
    """One split: sample j is (user[j], its history items[lo[j]:hi[j]], target[j], label[j])."""

    user: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    target: np.ndarray
    label: np.ndarray


def make_splits(seq: Sequences, seed: int = 0, max_history: int = 50) -> dict[str, Samples]:
    """train / val / test samples of the protocol above (vectorised over all positions)."""
    rng = np.random.default_rng(seed)
    lengths = np.diff(seq.offsets)
    user = np.repeat(np.arange(len(lengths)), lengths)
    t = np.arange(len(seq.items)) - seq.offsets[user]  # 0-based position in its sequence
    n = lengths[user]
    keep = t >= 1
    where = {"train": keep & (t <= n - 3), "val": keep & (t == n - 2), "test": keep & (t == n - 1)}
    seen = np.unique(user * seq.num_items + seq.items)
    out = {}
    for name, mask in where.items():
        idx = np.flatnonzero(mask)
        u, hi = user[idx], idx
        lo = np.maximum(seq.offsets[u], hi - max_history)
        neg = unseen_items(u, seq.num_items, seen, rng)
        out[name] = Samples(np.r_[u, u], np.r_[lo, lo], np.r_[hi, hi], np.r_[seq.items[idx], neg],
                            np.r_[np.ones(len(idx)), np.zeros(len(idx))].astype(np.float32))
    return out


def unseen_items(users: np.ndarray, num_items: int, seen: np.ndarray, rng) -> np.ndarray:
    """One item per user [E], uniform among the items the user has no interaction with;
    ``seen`` holds sorted keys user * num_items + item of every interaction."""
    neg = rng.integers(0, num_items, len(users))
    todo = np.arange(len(users))
    while len(todo):
        key = users[todo] * num_items + neg[todo]
        at = np.searchsorted(seen, key).clip(max=len(seen) - 1)
        todo = todo[seen[at] == key]
        neg[todo] = rng.integers(0, num_items, len(todo))
    return neg


class SequenceBatches:
    """Batches of one split (the CTR loop's interface: ``set_epoch``, ``len``, iteration):
    ``Batch(dense [B, 0], sparse KJT of stride 2B, labels [B], groups = users [B])``."""

    def __init__(self, seq: Sequences, samples: Samples, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.seq, self.s, self.batch_size, self.shuffle, self.seed = seq, samples, batch_size, shuffle, seed
        self.features = ["item"] + (["cat"] if seq.categories is not None else [])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.s.label) // self.batch_size)

    def batch(self, rows: np.ndarray) -> Batch:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        s = self.s
        lens = s.hi[rows] - s.lo[rows]
        hist = self.seq.items[ranges(s.lo[rows], lens)]
        items = np.r_[s.target[rows], hist]
        lengths = np.r_[np.ones(len(rows), np.int64), lens]
        values = [items] + ([self.seq.categories[items]] if self.seq.categories is not None else [])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            self.features, torch.from_numpy(np.concatenate(values)), torch.from_numpy(np.tile(lengths, len(values))))
        return Batch(torch.zeros(len(rows), 0), kjt, torch.from_numpy(s.label[rows]), torch.from_numpy(s.user[rows]))

    def __iter__(self):
        n = len(self.s.label)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        yield from prefetched(self.batch(order[a : a + self.batch_size]) for a in range(0, n, self.batch_size))
