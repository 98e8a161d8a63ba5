"""DIN (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018)
and its base model (sum pooling), over any rectables unpooled collection.

Input: the KJT of :mod:`data.sequences` (stride 2B: bags 0..B-1 the targets, one id each;
bags B..2B-1 the histories), features ``item`` and optionally ``cat``, whose embeddings are
concatenated (De = D x features).  The histories stay jagged: N = all history items of the
batch, never padded.
- Attention (DIN): for history item k of sample b, an MLP (default 80-40-1) scores
  [q_b, k, q_b - k, q_b * k]; the weights are used as they are (the paper: no softmax, so
  the pooled vector keeps the intensity of the interest) or, with ``softmax``, normalised
  within each history (as the official code does).  An empty history pools to zeros.
- Base: the sum of the history embeddings.
Then an MLP (default 200-80-1) over [q, pooled].  Activations: Dice (the paper's, data-
adaptive PReLU: p(s) = sigmoid(batch-normalised s), f(s) = p s + (1 - p) alpha s) or PReLU.
"""
from __future__ import annotations

import torch
from torch import nn

from models import din_ops as ops
from models.din_ops import _DiceFn, _PoolFn, _QueryLayerFn, _query_layer, _segments


class Dice(nn.Module):
    """[N, H] -> [N, H]: p(s) s + (1 - p(s)) alpha s, p(s) = sigmoid((s - E s) / sqrt(Var s + eps)),
    E and Var over the rows in training (running averages, momentum 0.1, kept for eval) and
    their running averages in eval; alpha per unit, starting at 0.  ``forward(x, head)``
    with a ``Linear(H, 1)`` head gives ``head(dice(x))`` [N, 1] in one fused op, without
    the [N, H] activations."""

    def __init__(self, width: int, eps: float = 1e-8, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, x: torch.Tensor, head: nn.Linear | None = None) -> torch.Tensor:
        H = self.alpha.numel()
        if x.dim() != 2 or x.shape[1] != H:  # the kernels read what the shape promises
            raise ValueError(f"Dice({H}) takes [N, {H}] rows, got {tuple(x.shape)}")
        if head is not None and (head.in_features, head.out_features, head.bias is None) != (H, 1, False):
            raise ValueError(f"Dice({H}) fuses a Linear({H}, 1) head with a bias, got {head}")
        v, c = (None, None) if head is None else (head.weight, head.bias)
        if self.training and x.shape[0] > 1:
            out, mean, var = _DiceFn.apply(x, self.alpha, v, c, None, self.eps)
            self.track(mean, var, x.shape[0])
        else:
            stats = (self.running_mean, (self.running_var + self.eps).rsqrt())
            out = _DiceFn.apply(x, self.alpha, v, c, stats, self.eps)[0]
        return out if head is None else out[:, None]

    @torch.no_grad()
    def track(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Move the running averages towards a training batch's mean and biased var [H] of n rows."""
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * n / (n - 1), self.momentum)


def _mlp(widths: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), Dice(b) if activation == "dice" else nn.PReLU(b)]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


class DIN(nn.Module):
    """forward(dense [B, 0] (unused: there are no dense features), sparse KJT) -> logits [B]."""

    def __init__(self, embedding: nn.Module, attention: tuple[int, ...] = (80, 40), hidden: tuple[int, ...] = (200, 80),
                 activation: str = "dice", softmax: bool = False, pooling: str = "attention"):
        super().__init__()
        if activation not in ("dice", "prelu"):
            raise ValueError(f"activation must be 'dice' or 'prelu', got {activation!r}")
        if pooling not in ("attention", "sum"):
            raise ValueError(f"pooling must be 'attention' (DIN) or 'sum' (base model), got {pooling!r}")
        if softmax and pooling == "sum":
            raise ValueError("softmax applies to attention pooling only")
        names = list(embedding.feature_names)
        if names[:1] != ["item"] or set(names) - {"item", "cat"}:
            raise ValueError(f"DIN reads the features 'item' and optionally 'cat', got {names}")
        self.embedding, self.features = embedding, names
        De = embedding.dims[0] * len(names)  # an unpooled collection has one dim
        self.softmax, self.pooling = softmax, pooling
        self.attention = _mlp([4 * De, *attention, 1], activation) if pooling == "attention" else None
        self.mlp = _mlp([2 * De, *hidden, 1], activation)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        out = self.embedding(sparse)
        B, names = sparse.stride() // 2, sparse.keys()
        per_key = sparse.lengths().view(len(names), 2 * B)  # [features, 2B]: targets, then histories
        item = per_key[names.index("item")]
        for f in self.features[1:]:  # cat[n] is item[n]'s category: the bags must line up
            if not torch.equal(per_key[names.index(f)], item):
                raise ValueError(f"DIN: feature {f!r} has other bag lengths than 'item' (each item needs its {f})")
        e = _side_by_side([out[f].values() for f in self.features])  # [B + N, De]
        offsets = torch.zeros(B + 1, dtype=torch.long)
        torch.cumsum(item[B:], 0, out=offsets[1:])
        if self.pooling == "sum":
            q, keys = e[:B], e[B:]
            pooled = torch.zeros_like(q).index_add(0, _segments(offsets, len(keys)), keys)
            return self.mlp(torch.cat([q, pooled], 1)).squeeze(1)
        q, pooled = self._attend(e, offsets)  # [B, De], [B, De]
        return self.mlp(torch.cat([q, pooled], 1)).squeeze(1)

    def _attend(self, e: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the queries [B, De], each history pooled by the attention MLP's scores [B, De]), the
        scores on [q, k, q - k, q * k] [N, 4 De] without building it: in training with Dice,
        the whole MLP as one op (:class:`~models.din_ops._AttentionFn`, which also pools where
        the scores are not normalised); else the first layer in
        :class:`~models.din_ops._QueryLayerFn`, the last with the Dice before it
        (``Dice(h, head)``)."""
        first, *rest = self.attention
        B, acts, lins = offsets.numel() - 1, rest[::2], rest[1::2]
        N = e.shape[0] - B
        if all(isinstance(a, Dice) and a.training for a in acts) and acts and N > 1 and ops._native is not None and \
                all(t.dtype == torch.float32 for t in (e, *self.attention.parameters())):  # as one op
            hidden = [t for lin in lins[:-1] for t in (lin.weight, lin.bias)]
            out, q, *stats = ops._AttentionFn.apply(tuple(a.eps for a in acts), not self.softmax, e, offsets,
                                                   first.weight, first.bias, lins[-1].weight, lins[-1].bias,
                                                   *(a.alpha for a in acts), *hidden)
            for a, mean, var in zip(acts, stats[::2], stats[1::2]):
                a.track(mean, var, N)
            if not self.softmax:
                return q, out
            w = out
        else:
            W1, W2, W3, W4 = first.weight.split(e.shape[1], 1)
            w, q = _query_layer(e, offsets, W2 - W3, W4, W1 + W3, first.bias)
            for act, lin in zip(rest[::2], rest[1::2]):
                w = act(w, lin) if lin is rest[-1] and isinstance(act, Dice) else lin(act(w))
            w = w.squeeze(1)
        if self.softmax:
            w = segment_softmax(w, _segments(offsets, len(w)), B)
        return q, _PoolFn.apply(e, w, offsets)


def _side_by_side(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts, 1), or where the parts are adjacent column blocks, in order, of one
    row-major tensor (as a rectables collection returns its features' rows: views of one
    lookup), that block as a view: no copy forward and none in the split's backward
    (DIN's step 35.8-36.7 -> 33.3-35.1 ms, interleaved A/B)."""
    base = parts[0]._base
    if base is None or base.dim() != 2 or base.stride(1) != 1:
        return torch.cat(parts, 1)
    first = at = parts[0].storage_offset() - base.storage_offset()
    for p in parts:  # each starts where the previous ends, over all the base's rows
        if p._base is not base or p.stride() != base.stride() or p.shape[0] != base.shape[0] or \
                p.storage_offset() - base.storage_offset() != at:
            return torch.cat(parts, 1)
        at += p.shape[1]
    return base if at - first == base.shape[1] else base.narrow(1, first, at - first)  # (a full narrow's
    # backward still zero-fills and copies [B + N, De])


def segment_softmax(w: torch.Tensor, seg: torch.Tensor, B: int) -> torch.Tensor:
    """Softmax of w [N] within each segment seg [N] in [0, B)."""
    top = torch.full((B,), -torch.inf, dtype=w.dtype).scatter_reduce(0, seg, w.detach(), "amax")
    ex = torch.exp(w - top[seg])
    return ex / torch.zeros(B, dtype=w.dtype).index_add(0, seg, ex)[seg]
