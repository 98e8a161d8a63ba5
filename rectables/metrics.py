"""Streaming AUC (histogram of predicted probabilities) and logloss; with groups (users),
also GAUC (Zhou et al., DIN, KDD 2018): the AUC of each user's impressions, weighted by
their number, over users with both a click and a non-click."""
from __future__ import annotations

import numpy as np
import torch


class StreamingMetrics:
    """Accumulate (logits [B], labels [B]) batch by batch; AUC from ``bins`` probability bins
    (error below 1/bins), logloss exact."""

    def __init__(self, bins: int = 1 << 16) -> None:
        self.bins = bins
        self.pos = torch.zeros(bins, dtype=torch.float64)
        self.neg = torch.zeros(bins, dtype=torch.float64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.n = 0

        self._groups: list[np.ndarray] = []  # (group, score, label) kept only when groups are given
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        if groups is not None:
            self._groups.append(groups.numpy().copy())
            self._scores.append(logits.detach().double().numpy().copy())
            self._labels.append(labels.numpy().copy())
        logits, labels = logits.double(), labels.double()
        self.loss_sum += torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        self.n += labels.numel()
        b = (torch.sigmoid(logits) * self.bins).long().clamp_(0, self.bins - 1)
        self.pos += torch.bincount(b, weights=labels, minlength=self.bins)
        self.neg += torch.bincount(b, weights=1 - labels, minlength=self.bins)

    def auc(self) -> float:
        p, n = self.pos.sum(), self.neg.sum()
        if p == 0 or n == 0:
            return float("nan")
        neg_below = torch.cumsum(self.neg, 0) - self.neg
        return float(((self.pos * (neg_below + 0.5 * self.neg)).sum()) / (p * n))

    def result(self) -> dict:
        out = {"auc": self.auc(), "logloss": float(self.loss_sum) / max(self.n, 1), "n": self.n}
        if self._groups:
            out["gauc"] = grouped_auc(np.concatenate(self._groups), np.concatenate(self._scores),
                                      np.concatenate(self._labels))
        return out


def grouped_auc(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    """sum_g n_g AUC_g / sum_g n_g over groups with both classes (ties count one half);
    NaN if there is no such group.  Vectorised: one sort, ranks with ties averaged."""
    n = len(scores)
    if n == 0:
        return float("nan")
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order] > 0.5
    new_group = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_group) - 1
    start = np.flatnonzero(new_group)
    tie_start = np.r_[True, new_group[1:] | (s[1:] != s[:-1])]
    first = np.flatnonzero(tie_start)
    count = np.diff(np.r_[first, n])
    rank_in_group = first - start[gid[first]] + (count + 1) / 2  # 1-based, ties averaged
    rank = np.repeat(rank_in_group, count)
    size = np.bincount(gid).astype(np.float64)
    npos = np.bincount(gid, weights=y.astype(np.float64))
    rank_pos = np.bincount(gid, weights=np.where(y, rank, 0.0))
    nneg = size - npos
    ok = (npos > 0) & (nneg > 0)
    if not ok.any():
        return float("nan")
    auc = (rank_pos[ok] - npos[ok] * (npos[ok] + 1) / 2) / (npos[ok] * nneg[ok])
    return float((auc * size[ok]).sum() / size[ok].sum())
