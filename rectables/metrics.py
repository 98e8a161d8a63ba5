"""Streaming AUC (histogram of predicted probabilities) and logloss."""
from __future__ import annotations

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

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
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
        return {"auc": self.auc(), "logloss": float(self.loss_sum) / max(self.n, 1), "n": self.n}
