"""Fixed-size batches straight from the memmaps into KeyedJaggedTensor + dense + labels."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Batch:
    """dense float32 [B, Nd]; sparse KJT (F keys, one id each, B bags); labels float32 [B]."""

    dense: torch.Tensor
    sparse: object
    labels: torch.Tensor
    groups: torch.Tensor | None = None  # user of each row [B] where a metric groups by it (GAUC)


class CriteoBatches:
    """Iterate one split of a preprocessed directory in batches of ``batch_size``.

    With ``shuffle`` the order is a permutation seeded by (seed, epoch): call
    ``set_epoch`` so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, data_dir, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, prefetch: bool = True):
        from data.preprocess import open_dataset

        d = Path(data_dir)
        self.meta = open_dataset(d)
        self.features = self.meta["features"]
        self.labels = np.load(d / "labels.npy", mmap_mode="r")
        self.dense = np.load(d / "dense.npy", mmap_mode="r")
        self.sparse = np.load(d / "sparse.npy", mmap_mode="r")
        self.index = np.load(d / f"split_{split}.npy")
        self.batch_size, self.shuffle, self.seed, self.prefetch = batch_size, shuffle, seed, prefetch
        self.epoch = 0
        F = len(self.features)
        self._lengths = torch.ones(F * batch_size, dtype=torch.int64)
        self._offsets = torch.arange(F * batch_size + 1, dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def _batch(self, rows: np.ndarray) -> Batch:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        rows = np.sort(rows)  # memmap locality; order inside a batch does not matter
        B, F = len(rows), len(self.features)
        values = torch.from_numpy(np.ascontiguousarray(self.sparse[rows].T)).reshape(-1)
        lengths = self._lengths[: F * B] if B == self.batch_size else torch.ones(F * B, dtype=torch.int64)
        offsets = self._offsets if B == self.batch_size else torch.arange(F * B + 1, dtype=torch.int64)
        kjt = KeyedJaggedTensor(keys=self.features, values=values, lengths=lengths, offsets=offsets, stride=B)
        return Batch(torch.from_numpy(self.dense[rows]), kjt, torch.from_numpy(self.labels[rows]))

    def _batches(self):
        idx = self.index
        if self.shuffle:
            idx = idx[np.random.default_rng([self.seed, self.epoch]).permutation(len(idx))]
        for s in range(0, len(idx), self.batch_size):
            yield self._batch(idx[s : s + self.batch_size])

    def __iter__(self):
        if not self.prefetch:
            yield from self._batches()
            return
        yield from prefetched(self._batches())


def prefetched(batches, depth: int = 2):
    """Iterate ``batches`` built ahead on a thread (``depth`` at a time); an error raised
    while building one is raised here, in the consumer, instead of leaving it waiting."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for b in batches:
                q.put(b)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (b := q.get()) is not done:
        if isinstance(b, BaseException):
            raise b
        yield b
