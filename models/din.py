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
    """y = s (alpha + p (1 - alpha)), p = sigmoid((s - mean) rstd), with a hand-written
    backward (batch-norm's included where the statistics are the batch's), and optionally
    a head Linear(H, 1) after it (weights v [H], bias c []): out = c + y v [N], y never
    stored.  forward -> (y [N, H] or out [N], batch mean [H], batch biased var [H]) (the
    last two: no grad)."""

    @staticmethod
    def forward(ctx, s, alpha, v, c, stats, eps: float):
        native = _native is not None and s.dtype == alpha.dtype == torch.float32 and (
            v is None or v.dtype == c.dtype == torch.float32)
        N, H = s.shape
        mean, rstd, var = (s.new_empty(H), s.new_empty(H), s.new_empty(H)) if stats is None else (*stats, None)
        s = s.contiguous() if native else s
        if native:
            out, p = s.new_empty(N) if v is not None else torch.empty_like(s), torch.empty_like(s)
            vd = None if v is None else v.detach().reshape(H).contiguous()
            _native.dice_forward(s.data_ptr(), N, H, alpha.detach().contiguous().data_ptr(), mean.data_ptr(),
                                 rstd.data_ptr(), 0 if var is None else var.data_ptr(), out.data_ptr(), p.data_ptr(),
                                 0 if vd is None else vd.data_ptr(), 0 if c is None else c.detach().data_ptr(), eps,
                                 stats is None)
        else:
            if stats is None:
                mean.copy_(s.mean(0))
                var.copy_((s * s).mean(0).sub_(mean * mean).clamp_(min=0))
                rstd.copy_((var + eps).rsqrt())
            out, p = _dice_forward(s, alpha, mean, rstd), None
            out = out if v is None else out @ v.reshape(H) + c.reshape(())
        ctx.save_for_backward(s, p, alpha, mean, rstd, v)
        ctx.batch_stats, ctx.native, ctx.c_shape = stats is None, native, None if c is None else c.shape
        if stats is not None:  # (no batch statistics to return)
            mean = var = s.new_empty(0)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, g, _gm, _gv):
        s, p, alpha, mean, rstd, v = ctx.saved_tensors
        N, H = s.shape
        g = g.contiguous()
        gv = gc = None
        if v is not None:  # g is the head's: g_out [N]
            gc = g.sum().reshape(ctx.c_shape)
        if ctx.native:
            g_s, g_alpha = torch.empty_like(s), torch.empty(H)
            vd = None if v is None else v.detach().reshape(H).contiguous()
            gv = None if v is None else torch.empty(H)
            _native.dice_backward(g.data_ptr(), s.data_ptr(), p.data_ptr(), N, H, alpha.detach().contiguous().data_ptr(),
                                  mean.data_ptr(), rstd.data_ptr(), ctx.batch_stats, g_s.data_ptr(), g_alpha.data_ptr(),
                                  0 if vd is None else vd.data_ptr(), 0 if gv is None else gv.data_ptr(), 0)
        else:
            if v is not None:  # through the head first
                gv = _dice_forward(s, alpha, mean, rstd).T @ g
                g = g[:, None] * v.reshape(1, H)
            g_s, g_alpha = _dice_backward(g, s, alpha, mean, rstd, ctx.batch_stats)
        return g_s, g_alpha, None if gv is None else gv.reshape(v.shape), gc, None, None


class _QueryLayerFn(torch.autograd.Function):
    """DIN's first attention layer on the pairs (q_b, k_n), q_b = e[b] and k_n = e[B + n]
    (key n in segment b).  With the layer's W = [W1 W2 W3 W4] [H, 4 De] and bias, its value
    on [q, k, q - k, q k] regroups as s [N, H] = c_b + (A + C diag(q_b)) k_n, A = W2 - W3,
    C = W4 and c = bias + q (W1 + W3)^T [B, H]: De multiply-adds a key and unit instead of
    the 4 De of the input as written (2 De of [k, q k]).  In C (models/_din_query.c);
    :func:`_query_layer` picks it, or torch's ops for other dtypes or without the kernels.
    forward(e, offsets, A, C, Wq = W1 + W3, bias, alpha, eps) -> (s, q = e[:B]); q's
    gradient (from its other uses) joins e's in this backward rather than through a slice's.
    With a Dice's alpha [H] (else None), the layer and the Dice after it in training, as
    one op: -> (Dice(s) [N, H], q, batch mean [H], biased var [H] (no grad)); the kernel
    sums Dice's statistics as it writes s, and its backward computes g_s from Dice's
    gradient sample by sample (no pass over [N, H] for either, no [N, H] g_s)."""

    @staticmethod
    def forward(ctx, e, offsets, A, C, Wq, bias, alpha, eps):
        (H, D), B = A.shape, offsets.numel() - 1
        e = e.contiguous()
        c = torch.addmm(bias.detach(), e[:B], Wq.detach().T)
        Hp = -(-H // 16) * 16  # the kernel reads whole vectors: A^T and C^T rows padded
        At, Ct = (torch.nn.functional.pad(m.detach().T, (0, Hp - H)).contiguous() for m in (A, C))
        N = e.shape[0] - B
        s, sums = e.new_empty(N, H), None if alpha is None else torch.zeros(2, 2, Hp, dtype=torch.float64)
        _native.query_forward(e.data_ptr(), B, N, D, offsets.data_ptr(), At.data_ptr(), Ct.data_ptr(), c.data_ptr(),
                              H, s.data_ptr(), 0 if sums is None else sums.data_ptr())
        ctx.save_for_backward(e, offsets, A, C, Wq)
        ctx.dice = alpha is not None
        if alpha is None:
            return s, e[:B].clone()
        total, sq = sums.sum(0)[:, :H] / N  # (as Dice's kernel: in double, then float)
        mean, var = total.float(), (sq - total * total).clamp_(min=0).float()
        rstd, alpha = (var + eps).rsqrt(), alpha.detach().contiguous()
        y, p = torch.empty_like(s), torch.empty_like(s)
        _native.dice_forward(s.data_ptr(), N, H, alpha.data_ptr(), mean.data_ptr(), rstd.data_ptr(), 0, y.data_ptr(),
                             p.data_ptr(), 0, 0, eps, False)
        ctx.dice_saved = s, p, alpha, mean, rstd
        ctx.mark_non_differentiable(mean, var)
        return y, e[:B].clone(), mean, var

    @staticmethod
    def backward(ctx, gs, gq, *_):
        e, offsets, A, C, Wq = ctx.saved_tensors
        (H, D), B = A.shape, offsets.numel() - 1
        N = e.shape[0] - B
        Dp = -(-D // 16) * 16
        Ap, Cp = (torch.nn.functional.pad(m.detach(), (0, Dp - D)).contiguous() for m in (A, C))
        gs = gs.contiguous()
        ge, gc, gA, gC = torch.empty_like(e), e.new_empty(B, H), e.new_empty(2, H, Dp), e.new_empty(2, H, Dp)
        dice, g_alpha = [0] * 6, None
        if ctx.dice:  # Dice's first pass: g_alpha and the means its g_s needs
            s, p, alpha, mean, rstd = ctx.dice_saved
            g_alpha, mg = e.new_empty(H), e.new_empty(2, H)
            _native.dice_backward(gs.data_ptr(), s.data_ptr(), p.data_ptr(), N, H, alpha.data_ptr(), mean.data_ptr(),
                                  rstd.data_ptr(), True, 0, g_alpha.data_ptr(), 0, 0, mg.data_ptr())
            dice = [t.data_ptr() for t in (s, p, mean, rstd, alpha, mg)]
        _native.query_backward(gs.data_ptr(), e.data_ptr(), B, N, D, offsets.data_ptr(), Ap.data_ptr(), Cp.data_ptr(),
                               H, ge.data_ptr(), gc.data_ptr(), gA.data_ptr(), gC.data_ptr(), *dice)
        ge[:B].addmm_(gc, Wq.detach())  # through c
        if gq is not None:
            ge[:B] += gq
        return ge, None, gA.sum(0)[:, :D], gC.sum(0)[:, :D], gc.T @ e[:B], gc.sum(0), g_alpha, None


def _query_layer(e, offsets, A, C, Wq, bias):
    """:class:`_QueryLayerFn`'s values, in C for float32, else in torch's ops."""
    if _native is not None and e.dtype == A.dtype == C.dtype == Wq.dtype == torch.float32:
        return _QueryLayerFn.apply(e, offsets, A, C, Wq, bias, None, 0.0)
    B = offsets.numel() - 1
    q, keys, seg = e[:B], e[B:], _segments(offsets, e.shape[0] - B)
    c = torch.addmm(bias, q, Wq.T)
    return c.index_select(0, seg) + keys @ A.T + (q.index_select(0, seg) * keys) @ C.T, q


class _PoolFn(torch.autograd.Function):
    """(e [B + N, De] (the B queries, then the N history keys; key n in segment b), w [N]) ->
    p [B, De], p_b = the sum of w_n k_n over segment b."""

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
        q, w = self._scores(e, offsets)  # [B, De], [N]
        if self.softmax:
            w = segment_softmax(w, _segments(offsets, len(w)), B)
        return self.mlp(torch.cat([q, _PoolFn.apply(e, w, offsets)], 1)).squeeze(1)

    def _scores(self, e: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the queries [B, De], the attention MLP's scores [N]) on [q, k, q - k, q * k] [N, 4 De]
        without building it: the first layer in :class:`_QueryLayerFn`, the last with the
        Dice before it (``Dice(h, head)``)."""
        first, *rest = self.attention
        W1, W2, W3, W4 = first.weight.split(e.shape[1], 1)
        dice, N = rest[0] if rest and isinstance(rest[0], Dice) else None, e.shape[0] - offsets.numel() + 1
        if len(rest) > 2 and dice is not None and dice.training and N > 1 and _native is not None and \
                all(t.dtype == torch.float32 for t in (e, first.weight, first.bias, dice.alpha)):  # as one op
            h, q, mean, var = _QueryLayerFn.apply(e, offsets, W2 - W3, W4, W1 + W3, first.bias, dice.alpha, dice.eps)
            dice.track(mean, var, N)
            h, rest = rest[1](h), rest[2:]
        else:
            h, q = _query_layer(e, offsets, W2 - W3, W4, W1 + W3, first.bias)
        for act, lin in zip(rest[::2], rest[1::2]):
            h = act(h, lin) if lin is rest[-1] and isinstance(act, Dice) else lin(act(h))
        return q, h.squeeze(1)


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
    return base.narrow(1, first, at - first)


def segment_softmax(w: torch.Tensor, seg: torch.Tensor, B: int) -> torch.Tensor:
    """Softmax of w [N] within each segment seg [N] in [0, B)."""
    top = torch.full((B,), -torch.inf, dtype=w.dtype).scatter_reduce(0, seg, w.detach(), "amax")
    ex = torch.exp(w - top[seg])
    return ex / torch.zeros(B, dtype=w.dtype).index_add(0, seg, ex)[seg]
