"""Baselines a comparison shows next to the tables, so that a reader sees at once whether
the embeddings help at all: predicting the training base rate, and a logistic
regression on the dense features alone (no ids; Criteo's 13), where the data has any."""
from __future__ import annotations

import math

import torch

from rectables.metrics import StreamingMetrics


def _split(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense [R, Nd], labels [R]) of a split, dense as the models see it."""
    from data.loader import CriteoBatches

    parts = [(b.dense, b.labels) for b in CriteoBatches(data_dir, split, 1 << 16, prefetch=False)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fit_dense_regression(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, steps: int = 100):
    """Logistic regression on dense features x [R, Nd] (standardised; L-BFGS with L2
    ``l2``) -> a function from dense [B, Nd] to logits [B]."""
    p = float(y.mean().clamp(1e-6, 1 - 1e-6))
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.tensor(math.log(p / (1 - p)), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda dense: ((dense - mu) / sd) @ w + b


def baselines(data_dir: str) -> list[dict]:
    """Test AUC and logloss of the base rate and of a logistic regression on the dense
    features (:func:`fit_dense_regression` on the training split)."""
    x, y = _split(data_dir, "train")
    tx, ty = _split(data_dir, "test")
    p = float(y.mean().clamp(1e-6, 1 - 1e-6))
    rate = StreamingMetrics()
    rate.update(torch.full_like(ty, math.log(p / (1 - p))), ty)
    if x.shape[1] == 0:  # e.g. Avazu: nothing for the regression to read
        return [{"method": "base rate", **rate.result()}]
    lr = StreamingMetrics()
    lr.update(fit_dense_regression(x, y)(tx), ty)
    return [{"method": "base rate", **rate.result()},
            {"method": f"logistic regression, {x.shape[1]} dense features", **lr.result()}]
