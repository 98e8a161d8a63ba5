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


def _dice_forward(s, alpha, mean, rstd):
    p = torch.sigmoid((s - mean) * rstd)
    return s * (p * (1 - alpha) + alpha), p


def _dice_backward(g, s, alpha, p, mean, rstd, batch_stats: bool):
    """(grad of s, grad of alpha); with batch_stats also through the batch mean and
    variance (batch-norm's backward: rstd (g_z - mean g_z - z mean(g_z z)))."""
    z = (s - mean) * rstd
    g_alpha = (g * s * (1 - p)).sum(0)
    g_z = g * s * (1 - alpha) * p * (1 - p)
    g_s = g * (alpha + p * (1 - alpha))
    if batch_stats:
        return g_s + rstd * (g_z - g_z.mean(0) - z * (g_z * z).mean(0)), g_alpha
    return g_s + g_z * rstd, g_alpha


_KERNELS: dict = {}


def _kernels(compiled: bool):
    """The Dice math, fused by torch.compile (dynamic shapes; compiled once per process):
    on a DIN step's [N, 80] and [N, 40] activations the eager ops took 38 + 51 ms a call
    against 14 + 11 compiled (N = 40k, 2 threads).  Where compiling fails (no C++ compiler)
    the eager functions are used, with one warning."""
    if not compiled:
        return _dice_forward, _dice_backward
    if not _KERNELS:
        try:
            f = torch.compile(_dice_forward, dynamic=True)
            b = torch.compile(_dice_backward, dynamic=True)
            x = torch.randn(4, 3)
            p = f(x, torch.zeros(3), x.mean(0), torch.ones(3))[1]
            b(x, x, torch.zeros(3), p, x.mean(0), torch.ones(3), True)
            b(x, x, torch.zeros(3), p, x.mean(0), torch.ones(3), False)
            _KERNELS.update(fwd=f, bwd=b)
        except Exception as e:  # noqa: BLE001 - any inductor failure: the eager path gives the same values
            import warnings

            warnings.warn(f"Dice runs eagerly (slower): torch.compile failed ({type(e).__name__}: {e})")
            _KERNELS.update(fwd=_dice_forward, bwd=_dice_backward)
    return _KERNELS["fwd"], _KERNELS["bwd"]


class _DiceFn(torch.autograd.Function):
    """y = s (alpha + p (1 - alpha)), p = sigmoid((s - mean) rstd), with a hand-written
    backward (batch-norm's included)."""

    @staticmethod
    def forward(ctx, s, alpha, mean, rstd, batch_stats: bool, compiled: bool):
        fwd, _ = _kernels(compiled)
        y, p = fwd(s, alpha, mean, rstd)
        ctx.save_for_backward(s, alpha, p, mean, rstd)
        ctx.batch_stats, ctx.compiled = batch_stats, compiled
        return y

    @staticmethod
    def backward(ctx, g):
        _, bwd = _kernels(ctx.compiled)
        g_s, g_alpha = bwd(g.contiguous(), *ctx.saved_tensors, ctx.batch_stats)
        return g_s, g_alpha, None, None, None, None


class Dice(nn.Module):
    """[B, H] -> [B, H]: p(s) s + (1 - p(s)) alpha s, p(s) = sigmoid((s - E s) / sqrt(Var s + eps)),
    E and Var over the batch in training (running averages, momentum 0.1, kept for eval) and
    their running averages in eval; alpha per unit, starting at 0."""

    def __init__(self, width: int, eps: float = 1e-8, momentum: float = 0.1, compiled: bool = True):
        super().__init__()
        self.eps, self.momentum, self.compiled = eps, momentum, compiled
        self.alpha = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.training and s.shape[0] > 1:
            x = s.detach()
            mean = x.mean(0)  # (var_mean over dim 0: 10.5 ms on [26000, 80], these two means 1.2 ms)
            var = (x * x).mean(0).sub_(mean * mean).clamp_(min=0)
            with torch.no_grad():
                n = s.shape[0]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
            return _DiceFn.apply(s, self.alpha, mean, (var + self.eps).rsqrt(), True, self.compiled)
        return _DiceFn.apply(s, self.alpha, self.running_mean, (self.running_var + self.eps).rsqrt(), False,
                             self.compiled)


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
        B = sparse.stride() // 2
        lengths = sparse["item"].lengths()[B:]
        e = torch.cat([out[f].values() for f in self.features], 1)  # [B + N, De]
        q, keys = e[:B], e[B:]
        seg = torch.repeat_interleave(torch.arange(B), lengths, output_size=keys.shape[0])  # [N]
        pooled = torch.zeros_like(q)
        if self.pooling == "sum":
            return self.mlp(torch.cat([q, pooled.index_add(0, seg, keys)], 1)).squeeze(1)
        w = self.attention[1:](self._first_layer(q, keys, seg)).squeeze(1)  # [N]
        if self.softmax:
            w = segment_softmax(w, seg, B)
        return self.mlp(torch.cat([q, pooled.index_add(0, seg, keys * w[:, None])], 1)).squeeze(1)

    def _first_layer(self, q: torch.Tensor, keys: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """The attention's first layer on [q, k, q - k, q * k] [N, 4 De] without building it:
        q (W1 + W3) + b per sample, gathered, + [k, q * k] [W2 - W3; W4]: half the FLOPs."""
        lin = self.attention[0]
        W1, W2, W3, W4 = lin.weight.split(q.shape[1], 1)
        qw = torch.addmm(lin.bias, q, (W1 + W3).T)  # [B, H]
        qk = q.index_select(0, seg)  # (its backward is an index_add; q[seg]'s a slow accumulating index_put)
        return torch.addmm(qw.index_select(0, seg), torch.cat([keys, qk * keys], 1), torch.cat([W2 - W3, W4], 1).T)


def segment_softmax(w: torch.Tensor, seg: torch.Tensor, B: int) -> torch.Tensor:
    """Softmax of w [N] within each segment seg [N] in [0, B)."""
    top = torch.full((B,), -torch.inf, dtype=w.dtype).scatter_reduce(0, seg, w.detach(), "amax")
    ex = torch.exp(w - top[seg])
    return ex / torch.zeros(B, dtype=w.dtype).index_add(0, seg, ex)[seg]
