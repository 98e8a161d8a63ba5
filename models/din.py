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
    return s * (torch.sigmoid((s - mean) * rstd) * (1 - alpha) + alpha)


def _dice_backward(g, s, alpha, mean, rstd, batch_stats: bool):
    """(grad of s, grad of alpha); with batch_stats also through the batch mean and
    variance (batch-norm's backward: rstd (g_z - mean g_z - z mean(g_z z)))."""
    z = (s - mean) * rstd
    p = torch.sigmoid(z)
    g_alpha = (g * s * (1 - p)).sum(0)
    g_z = g * s * (1 - alpha) * p * (1 - p)
    g_s = g * (alpha + p * (1 - alpha))
    if batch_stats:
        return g_s + rstd * (g_z - g_z.mean(0) - z * (g_z * z).mean(0)), g_alpha
    return g_s + g_z * rstd, g_alpha


try:  # the C kernels (models/_din.c): Dice in two passes over [N, H] each way instead of ~5 eager ops
    from models import _din as _native
except ImportError:  # not built: the torch functions here, same values
    _native = None


class _DiceFn(torch.autograd.Function):
    """y = s (alpha + p (1 - alpha)), p = sigmoid((s - mean) rstd), s = x + add[segment]
    where ``add`` [B, H] is given (rows of segment b: offsets[b] .. offsets[b+1]-1), with a
    hand-written backward (batch-norm's included where the statistics are the batch's).
    forward -> (y [N, H], batch mean [H], batch biased var [H]) (the last two: no grad)."""

    @staticmethod
    def forward(ctx, x, alpha, add, offsets, stats, eps: float):
        native = _native is not None and x.dtype == torch.float32 and alpha.dtype == torch.float32 and (
            add is None or add.dtype == torch.float32)
        N, H = x.shape
        mean, rstd, var = (x.new_empty(H), x.new_empty(H), x.new_empty(H)) if stats is None else (*stats, None)
        if native:
            x, alpha = x.contiguous(), alpha.detach().contiguous()
            s = x if add is None else torch.empty_like(x)
            a = None if add is None else add.detach().contiguous()
            y, p = torch.empty_like(x), torch.empty_like(x)
            B = 0 if offsets is None else offsets.numel() - 1
            _native.dice_forward(x.data_ptr(), s.data_ptr(), N, H, 0 if a is None else a.data_ptr(),
                                 0 if offsets is None else offsets.data_ptr(), B, alpha.data_ptr(), mean.data_ptr(),
                                 rstd.data_ptr(), 0 if var is None else var.data_ptr(), y.data_ptr(), p.data_ptr(),
                                 eps, stats is None)
        else:
            s = x if add is None else x + add.index_select(0, _segments(offsets, N))
            if stats is None:
                mean.copy_(s.mean(0))
                var.copy_((s * s).mean(0).sub_(mean * mean).clamp_(min=0))
                rstd.copy_((var + eps).rsqrt())
            y, p = _dice_forward(s, alpha, mean, rstd), None
        ctx.save_for_backward(s, p, alpha, mean, rstd, offsets)
        ctx.batch_stats, ctx.native, ctx.has_add = stats is None, native, add is not None
        if stats is not None:  # (no batch statistics to return)
            mean = var = x.new_empty(0)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, g, _gm, _gv):
        s, p, alpha, mean, rstd, offsets = ctx.saved_tensors
        g = g.contiguous()
        N, H = s.shape
        if ctx.native:
            g_s, g_alpha = torch.empty_like(s), torch.empty(H)
            g_add = torch.empty(offsets.numel() - 1, H) if ctx.has_add else None
            _native.dice_backward(g.data_ptr(), s.data_ptr(), p.data_ptr(), N, H, alpha.data_ptr(), mean.data_ptr(),
                                  rstd.data_ptr(), ctx.batch_stats, g_s.data_ptr(), g_alpha.data_ptr(),
                                  0 if offsets is None else offsets.data_ptr(), 0 if g_add is None else g_add.shape[0],
                                  0 if g_add is None else g_add.data_ptr())
        else:
            g_s, g_alpha = _dice_backward(g, s, alpha, mean, rstd, ctx.batch_stats)
            g_add = None if not ctx.has_add else g_s.new_zeros(offsets.numel() - 1, H).index_add_(
                0, _segments(offsets, N), g_s)
        return g_s, g_alpha, g_add, None, None, None


class _PairsFn(torch.autograd.Function):
    """e [B + N, De] (the B queries, then the N history keys; key n in segment b) -> (the
    attention's pair inputs X [N, 2 De] = [k_n, q_b * k_n], the queries q [B, De]); the
    backward gives de in one pass (C), not through slices, a gather, a product and a
    concatenation."""

    @staticmethod
    def forward(ctx, e, offsets):
        B, N = offsets.numel() - 1, e.shape[0] - offsets.numel() + 1
        ctx.native = _native is not None and e.dtype == torch.float32
        e = e.contiguous()
        if ctx.native:
            X = e.new_empty(N, 2 * e.shape[1])
            _native.pairs_forward(0, 0, e.data_ptr(), B, N, e.shape[1], offsets.data_ptr(), X.data_ptr(), 0)
        else:
            keys = e[B:]
            X = torch.cat([keys, e[:B].index_select(0, _segments(offsets, N)) * keys], 1)
        ctx.save_for_backward(e, offsets)
        return X, e[:B].clone()

    @staticmethod
    def backward(ctx, gX, gq):
        e, offsets = ctx.saved_tensors
        B, (N, D) = offsets.numel() - 1, e.shape
        gX = gX.contiguous() if gX is not None else e.new_zeros(N - B, 2 * D)
        if ctx.native:
            ge = torch.empty_like(e)
            gq = None if gq is None else gq.contiguous()
            _native.pairs_backward(gX.data_ptr(), 0 if gq is None else gq.data_ptr(), e.data_ptr(), B, N - B, D,
                                   offsets.data_ptr(), ge.data_ptr(), 0)
            return ge, None
        seg = _segments(offsets, N - B)
        g1, g2 = gX.split(D, 1)
        ge_q = e.new_zeros(B, D).index_add_(0, seg, g2 * e[B:])
        return torch.cat([ge_q if gq is None else ge_q + gq, g1 + g2 * e[:B].index_select(0, seg)]), None


class _PoolFn(torch.autograd.Function):
    """(e [B + N, De] as for _PairsFn, w [N]) -> p [B, De], p_b = the sum of w_n k_n over
    segment b."""

    @staticmethod
    def forward(ctx, e, w, offsets):
        B, N, D = offsets.numel() - 1, w.shape[0], e.shape[1]
        ctx.native = _native is not None and e.dtype == w.dtype == torch.float32
        e, w = e.contiguous(), w.contiguous()
        if ctx.native:
            p = e.new_empty(B, D)
            _native.pool_forward(0, w.data_ptr(), e.data_ptr(), B, N, D, offsets.data_ptr(), p.data_ptr(), 0)
        else:
            p = e.new_zeros(B, D).index_add_(0, _segments(offsets, N), e[B:] * w[:, None])
        ctx.save_for_backward(e, w, offsets)
        return p

    @staticmethod
    def backward(ctx, gp):
        e, w, offsets = ctx.saved_tensors
        B, N, D = offsets.numel() - 1, w.shape[0], e.shape[1]
        gp = gp.contiguous()
        if ctx.native:
            ge, gw = torch.empty_like(e), torch.empty_like(w)
            _native.pool_backward(gp.data_ptr(), w.data_ptr(), e.data_ptr(), B, N, D, offsets.data_ptr(),
                                  ge.data_ptr(), gw.data_ptr())
            return ge, gw, None
        gps = gp.index_select(0, _segments(offsets, N))
        return torch.cat([e.new_zeros(B, D), gps * w[:, None]]), (gps * e[B:]).sum(1), None


def _segments(offsets: torch.Tensor, N: int) -> torch.Tensor:
    """The segment of each of the N rows, from offsets [B + 1]."""
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff(), output_size=N)


class Dice(nn.Module):
    """[N, H] -> [N, H]: p(s) s + (1 - p(s)) alpha s, p(s) = sigmoid((s - E s) / sqrt(Var s + eps)),
    E and Var over the rows in training (running averages, momentum 0.1, kept for eval) and
    their running averages in eval; alpha per unit, starting at 0.  ``forward(x, add,
    offsets)`` takes s = x + add[b] for the rows of segment b (add [B, H], offsets [B + 1]),
    added in the kernel's first pass instead of as a gathered [N, H] copy."""

    def __init__(self, width: int, eps: float = 1e-8, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None, offsets: torch.Tensor | None = None):
        _check_dice_args(x, self.alpha.numel(), add, offsets)
        if self.training and x.shape[0] > 1:
            y, mean, var = _DiceFn.apply(x, self.alpha, add, offsets, None, self.eps)
            with torch.no_grad():
                n = x.shape[0]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
            return y
        stats = (self.running_mean, (self.running_var + self.eps).rsqrt())
        return _DiceFn.apply(x, self.alpha, add, offsets, stats, self.eps)[0]


def _check_dice_args(x, H: int, add, offsets) -> None:
    """The kernels read what these shapes promise: refuse anything else, naming it."""
    if x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"Dice({H}) takes [N, {H}] rows, got {tuple(x.shape)}")
    if (add is None) != (offsets is None):
        raise ValueError("Dice: add and offsets go together")
    if add is None:
        return
    if add.dim() != 2 or add.shape[1] != H or offsets.dim() != 1 or offsets.numel() != add.shape[0] + 1 or \
            offsets.dtype != torch.long:
        raise ValueError(f"Dice: add must be [B, {H}] and offsets int64 [B + 1], got {tuple(add.shape)} and "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if offsets[0] != 0 or offsets[-1] != x.shape[0] or (offsets.diff() < 0).any():
        raise ValueError(f"Dice: offsets must rise from 0 to the {x.shape[0]} rows, got {offsets[0]} .. {offsets[-1]}")


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
        e = torch.cat([out[f].values() for f in self.features], 1)  # [B + N, De]
        offsets = torch.zeros(B + 1, dtype=torch.long)
        torch.cumsum(item[B:], 0, out=offsets[1:])
        if self.pooling == "sum":
            q, keys = e[:B], e[B:]
            pooled = torch.zeros_like(q).index_add(0, _segments(offsets, len(keys)), keys)
            return self.mlp(torch.cat([q, pooled], 1)).squeeze(1)
        X, q = _PairsFn.apply(e, offsets)  # (the gradient of q joins e's in the pairs' backward)
        w = self._scores(X, q, offsets)  # [N]
        if self.softmax:
            w = segment_softmax(w, _segments(offsets, len(w)), B)
        return self.mlp(torch.cat([q, _PoolFn.apply(e, w, offsets)], 1)).squeeze(1)

    def _scores(self, X: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The attention MLP on [q, k, q - k, q * k] [N, 4 De] without building it: the first
        layer is q (W1 + W3) + b per sample [B, H] plus X = [k, q * k] times [W2 - W3; W4]
        [N, H] (half the FLOPs), the per-sample part added by Dice's first pass (or
        gathered, for PReLU)."""
        lin, act = self.attention[0], self.attention[1]
        W1, W2, W3, W4 = lin.weight.split(q.shape[1], 1)
        qw = torch.addmm(lin.bias, q, (W1 + W3).T)  # [B, H]
        pre = X @ torch.cat([W2 - W3, W4], 1).T  # [N, H]
        if isinstance(act, Dice):
            h = act(pre, qw, offsets)
        else:
            h = act(pre + qw.index_select(0, _segments(offsets, len(pre))))
        return self.attention[2:](h).squeeze(1)


def segment_softmax(w: torch.Tensor, seg: torch.Tensor, B: int) -> torch.Tensor:
    """Softmax of w [N] within each segment seg [N] in [0, B)."""
    top = torch.full((B,), -torch.inf, dtype=w.dtype).scatter_reduce(0, seg, w.detach(), "amax")
    ex = torch.exp(w - top[seg])
    return ex / torch.zeros(B, dtype=w.dtype).index_add(0, seg, ex)[seg]
