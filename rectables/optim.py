"""Sparse optimizers for embedding storage.

SGD, Adagrad and row-wise Adagrad run fused into the lookup's backward, in
``rectables/_rowupdate.c`` (or fbgemm's own backward without it), on fbgemm's rows and
state (the gradient of a table is never materialised).  fbgemm's Adam does not run on CPU, so ``adam`` is our
own sparse row-wise Adam: first moment per element [M, D], second moment per row [M]
(as in fbgemm's PARTIAL_ROWWISE_ADAM), updated only on rows a batch touches ("lazy"
Adam), with bias correction from a global step count (Kingma & Ba, ICLR 2015).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")


@dataclass(frozen=True)
class SparseOptimizer:
    """Settings of the fused update applied to embedding rows during backward."""

    name: str = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r} is not one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must lie in [0, 1)")

    def state_floats(self, rows: int, dim: int) -> int:
        """Number of float32 optimizer-state values kept for a [rows, dim] table."""
        return {
            "sgd": 0,
            "adagrad": rows * dim,
            "rowwise_adagrad": rows,
            "adam": rows * dim + rows,
        }[self.name]


def sparse_adam_step(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    opt: SparseOptimizer,
) -> None:
    """Row-wise Adam on the touched rows, in place.

    weight, exp_avg: [M, D]; exp_avg_sq: [M]; rows: unique row ids [U]; grad: [U, D]
    (already summed over duplicate ids); step: 1-based global step.
    """
    m = exp_avg.index_select(0, rows).mul_(opt.beta1).add_(grad, alpha=1 - opt.beta1)
    v = exp_avg_sq.index_select(0, rows).mul_(opt.beta2)
    v.add_(grad.square().mean(1), alpha=1 - opt.beta2)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    bias1 = 1 - opt.beta1**step
    bias2 = 1 - opt.beta2**step
    denom = (v / bias2).sqrt_().add_(opt.eps).unsqueeze(1)
    weight.index_add_(0, rows, (m / denom).to(weight.dtype), alpha=-opt.lr / bias1)
