"""Implicit-feedback user-item data in the NGCF / LightGCN format (Gowalla split): one line
per user, ``user item item ...`` (space-separated, ids already 0-based and dense).

:func:`load_interactions` gives CSR arrays per split, :func:`normalized_adjacency` the
symmetric-normalised bipartite adjacency D^-1/2 A D^-1/2 over N = users + items nodes
(users first, items offset by the user count), as NGCF (Wang et al., SIGIR 2019) and
LightGCN (He et al., SIGIR 2020) define it.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Interactions:
    """CSR of one split: the items of user u are ``items[offsets[u]:offsets[u + 1]]``."""

    offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int64 [E]

    @property
    def users(self) -> np.ndarray:
        """The user of each interaction, int64 [E]."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))


def _read(path: Path, num_users: int | None) -> Interactions:
    opener = gzip.open if str(path).endswith(".gz") else open
    lists: dict[int, np.ndarray] = {}
    with opener(path, "rt") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                ids = np.array(parts, dtype=np.int64)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a line of integers ({e})") from e
            if (ids < 0).any():
                raise ValueError(f"{path}:{n}: negative id")
            if ids[0] in lists:
                raise ValueError(f"{path}:{n}: user {ids[0]} has a second line")
            lists[int(ids[0])] = np.unique(ids[1:])
    U = max(lists) + 1 if num_users is None else num_users
    if max(lists, default=-1) >= U:
        raise ValueError(f"{path}: user {max(lists)} is beyond the {U} users of the training file")
    counts = np.zeros(U, np.int64)
    for u, it in lists.items():
        counts[u] = len(it)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    items = np.concatenate([lists[u] for u in sorted(lists)]) if lists else np.zeros(0, np.int64)
    return Interactions(offsets, items)


def load_interactions(data_dir: str | Path) -> tuple[Interactions, Interactions, int, int]:
    """(train, test, num_users, num_items) of a directory with ``train.txt(.gz)`` and
    ``test.txt(.gz)``; users and items are counted over both files."""
    d = Path(data_dir)
    find = lambda name: next((p for p in (d / f"{name}.txt.gz", d / f"{name}.txt") if p.exists()), None)  # noqa: E731
    if find("train") is None or find("test") is None:
        raise FileNotFoundError(f"{d} holds no train.txt(.gz) and test.txt(.gz) in the NGCF format")
    train = _read(find("train"), None)
    test = _read(find("test"), None)
    U = max(len(train.offsets), len(test.offsets)) - 1
    train, test = (_pad(x, U) for x in (train, test))
    I = int(max(train.items.max(initial=-1), test.items.max(initial=-1))) + 1
    return train, test, U, I


def _pad(x: Interactions, U: int) -> Interactions:
    extra = U + 1 - len(x.offsets)
    return Interactions(np.concatenate([x.offsets, np.full(extra, x.offsets[-1])]), x.items) if extra else x


def normalized_adjacency(train: Interactions, num_users: int, num_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 as a sparse CSR float32 [N, N], N = users + items; A is the
    symmetric user-item adjacency of the training interactions (no self loops).  A node
    without edges has a zero row."""
    N = num_users + num_items
    u, i = torch.from_numpy(train.users), torch.from_numpy(train.items) + num_users
    rows, cols = torch.cat([u, i]), torch.cat([i, u])
    deg = torch.bincount(rows, minlength=N).float()
    inv = deg.pow(-0.5).masked_fill_(deg == 0, 0)
    vals = inv[rows] * inv[cols]
    return to_csr(torch.stack([rows, cols]), vals, N)


def to_csr(indices: torch.Tensor, values: torch.Tensor, N: int) -> torch.Tensor:
    """Sparse CSR [N, N] from COO indices [2, E] and values [E], without torch's notices
    (the invariants hold by construction; CSR's "beta" note is not the user's concern)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(indices, values, (N, N), check_invariants=False)
        return coo.coalesce().to_sparse_csr()
