"""The autograd ops of DIN (models/din.py) over the C kernels of models/_din*.c, with torch
functions that give the same values: the fallback where the kernels are not built or the
dtype is not float32, and the reference the tests hold the kernels to.  Shapes: N history
keys of B samples (key n in segment b: offsets [B + 1]), De the embedding width, H a layer's
units.  DIN: Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
"""
from __future__ import annotations

import torch


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
            vd, ad = None if v is None else v.detach().reshape(H).contiguous(), alpha.detach().contiguous()
            _native.dice_forward(s.data_ptr(), N, H, ad.data_ptr(), mean.data_ptr(),
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
            vd, ad = None if v is None else v.detach().reshape(H).contiguous(), alpha.detach().contiguous()
            gv = None if v is None else torch.empty(H)
            _native.dice_backward(g.data_ptr(), s.data_ptr(), p.data_ptr(), N, H, ad.data_ptr(),
                                  mean.data_ptr(), rstd.data_ptr(), ctx.batch_stats, g_s.data_ptr(), g_alpha.data_ptr(),
                                  0 if vd is None else vd.data_ptr(), 0 if gv is None else gv.data_ptr(), 0)
        else:
            if v is not None:  # through the head first
                gv = _dice_forward(s, alpha, mean, rstd).T @ g
                g = g[:, None] * v.reshape(1, H)
            g_s, g_alpha = _dice_backward(g, s, alpha, mean, rstd, ctx.batch_stats)
        return g_s, g_alpha, None if gv is None else gv.reshape(v.shape), gc, None, None


def _up16(n: int) -> int:
    return -(-n // 16) * 16


def _padded(m: torch.Tensor, cols: int) -> torch.Tensor:
    """m [R, C] -> [R, cols] contiguous, zeros on the right: the kernels read whole vectors."""
    return torch.nn.functional.pad(m.detach(), (0, cols - m.shape[1])).contiguous()


def _query_forward(e, offsets, A, C, Wq, bias, stats=None, eps=0.0):
    """s [N, H] of the first layer (see :class:`_QueryLayerFn`); with stats ([3, H]), the
    kernel also writes the batch statistics of s there: mean, biased var and 1 / sqrt(var +
    eps), summed in double as it writes the rows."""
    (H, D), B = A.shape, offsets.numel() - 1
    c = torch.addmm(bias.detach(), e[:B], Wq.detach().T)
    At, Ct = _padded(A.T, _up16(H)), _padded(C.T, _up16(H))
    s = e.new_empty(e.shape[0] - B, H)
    _native.query_forward(e.data_ptr(), B, s.shape[0], D, offsets.data_ptr(), At.data_ptr(), Ct.data_ptr(), c.data_ptr(),
                          H, s.data_ptr(), 0 if stats is None else stats.data_ptr(), eps)
    return s


def _query_backward(gs, gq, e, offsets, A, C, Wq, dice=(), pool=()):
    """(g_e, g_A, g_C, g_Wq, g_bias) from gs [N, H] and gq [B, De] (or None); with dice (s,
    mean, rstd, mg: a Dice with batch statistics after the layer), gs is that Dice's local
    part of g_s (the next layer's kernel makes it), finished in the kernel; with pool (w [N],
    g_p [B, De]: the keys also pooled, p_b = sum of w_n k_n), g_e's key rows include w_n g_p_b."""
    (H, D), B = A.shape, offsets.numel() - 1
    Ap, Cp = _padded(A, _up16(D)), _padded(C, _up16(D))
    ge, gc, gA, gC = torch.empty_like(e), e.new_empty(B, H), e.new_empty(H, D), e.new_empty(H, D)
    _native.query_backward(gs.data_ptr(), e.data_ptr(), B, e.shape[0] - B, D, offsets.data_ptr(), Ap.data_ptr(),
                           Cp.data_ptr(), H, ge.data_ptr(), gc.data_ptr(), gA.data_ptr(), gC.data_ptr(),
                           *([t.data_ptr() for t in dice] if dice else [0] * 4),
                           *([t.data_ptr() for t in pool] if pool else [0] * 2))
    ge[:B].addmm_(gc, Wq.detach())  # through c
    if gq is not None:
        ge[:B] += gq
    return ge, gA, gC, gc.T @ e[:B], gc.sum(0)


class _QueryLayerFn(torch.autograd.Function):
    """DIN's first attention layer on the pairs (q_b, k_n), q_b = e[b] and k_n = e[B + n]
    (key n in segment b).  With the layer's W = [W1 W2 W3 W4] [H, 4 De] and bias, its value
    on [q, k, q - k, q k] regroups as s [N, H] = c_b + (A + C diag(q_b)) k_n, A = W2 - W3,
    C = W4 and c = bias + q (W1 + W3)^T [B, H]: De multiply-adds a key and unit instead of
    the 4 De of the input as written (2 De of [k, q k]).  In C (models/_din_query.c);
    :func:`_query_layer` picks it, or torch's ops for other dtypes or without the kernels.
    forward(e, offsets, A, C, Wq = W1 + W3, bias) -> (s, q = e[:B]); q's gradient (from its
    other uses) joins e's in this backward rather than through a slice's."""

    @staticmethod
    def forward(ctx, e, offsets, A, C, Wq, bias):
        e = e.contiguous()
        ctx.save_for_backward(e, offsets, A, C, Wq)
        return _query_forward(e, offsets, A, C, Wq, bias), e[: offsets.numel() - 1].clone()

    @staticmethod
    def backward(ctx, gs, gq):
        ge, gA, gC, gWq, gb = _query_backward(gs.contiguous(), gq, *ctx.saved_tensors)
        return ge, None, gA, gC, gWq, gb


class _AttentionFn(torch.autograd.Function):
    """DIN's attention MLP in training with Dice on every hidden layer, as one op:
    forward(eps, pool, e, offsets, W [H, 4 De], bias, head v [1, H], c [1], *alphas, *hidden)
    -> (scores [N], or with pool the keys pooled by them, p_b = sum of w_n k_n [B, De] (as
    :class:`_PoolFn`, whose key gradients then join the first layer's in its kernel: no
    second [B + N, De] gradient to add); q = e[:B]; then each Dice's batch mean and biased
    var [H] (no grad)), where
    the first layer (W, bias) is computed as :class:`_QueryLayerFn`'s (A, C and Wq formed
    from W's blocks here: no autograd ops for them), ``alphas`` and ``eps`` (a tuple) are the
    k + 1 Dice layers', ``hidden`` the weights and biases of the k Linear layers between
    them (W, b, W, b ...).
    - first layer: its kernel also sums the first Dice's statistics as it writes s;
    - each hidden layer (models/_din_hidden.c): that Dice, then the Linear, a block of rows
      at a time (Dice's output never written), summing the next Dice's statistics;
    - the last Dice fused with the Linear(H, 1) head (as :class:`_DiceFn`).
    Backward in the same steps, the other way: the first Dice's g_s is split at its batch
    statistics, the local part made in the first hidden layer's backward (where its p and
    output gradient are read anyway) and finished per sample in the first layer's from s
    alone; the last Dice's a block of rows at a time in the last hidden layer's (any Dice
    between by its own kernel).  Default (80-40): 3 passes over
    [N, 80] or [N, 40] forward where the separate ops made 7, and no GEMM in torch's."""

    @staticmethod
    def forward(ctx, eps, pool, e, offsets, W1, bias, v, c, *rest):
        k = (len(rest) - 1) // 3
        alphas, hidden = rest[: k + 1], rest[k + 1 :]
        B, e = offsets.numel() - 1, e.contiguous()
        N = e.shape[0] - B
        H = W1.shape[0]
        Wa, Wb, Wc, Wd = W1.detach().split(e.shape[1], 1)  # on [q, k, q - k, q k]
        A, C, Wq = Wb - Wc, Wd, Wa + Wc
        st = e.new_empty(3, H)  # each Dice's batch mean, biased var, rstd: made in the kernels
        s = [_query_forward(e, offsets, A, C, Wq, bias, st, eps[0])]
        stats, ps = [st.unbind(0)], []
        alphas = [a.detach().contiguous() for a in alphas]
        for W, b, a, (mean, _, rstd) in zip(hidden[::2], hidden[1::2], alphas, stats):
            Hi, Ho = W.shape[1], W.shape[0]
            p, out, st = e.new_empty(N, Hi), e.new_empty(N, Ho), e.new_empty(3, Ho)
            Wt, bp = _padded(W.T, _up16(Ho)), _padded(b.reshape(1, Ho), _up16(Ho))
            _native.hidden_forward(s[-1].data_ptr(), N, Hi, mean.data_ptr(), rstd.data_ptr(), a.data_ptr(),
                                   Wt.data_ptr(), bp.data_ptr(), Ho, p.data_ptr(), out.data_ptr(), st.data_ptr(),
                                   eps[len(stats)])
            s.append(out)
            ps.append(p)
            stats.append(st.unbind(0))
        (mean, _, rstd), Hl = stats[-1], s[-1].shape[1]
        scores, p = e.new_empty(N), e.new_empty(N, Hl)
        vd = v.detach().reshape(Hl).contiguous()
        _native.dice_forward(s[-1].data_ptr(), N, Hl, alphas[-1].data_ptr(), mean.data_ptr(), rstd.data_ptr(), 0,
                             scores.data_ptr(), p.data_ptr(), vd.data_ptr(), c.detach().data_ptr(), eps[-1], False)
        ps.append(p)
        if pool:
            pooled = e.new_empty(B, e.shape[1])
            _native.pool_forward(0, scores.data_ptr(), e.data_ptr(), B, N, e.shape[1], offsets.data_ptr(),
                                 pooled.data_ptr(), 0)
        ctx.pool = scores if pool else None
        ctx.save_for_backward(e, offsets, A, C, Wq, *hidden[::2])  # (A, C, Wq: made here, no grad)
        ctx.s, ctx.ps, ctx.stats, ctx.alphas, ctx.v, ctx.c_shape = s, ps, stats, alphas, vd, c.shape
        out = [t for mean, var, _ in stats for t in (mean, var)]
        ctx.mark_non_differentiable(*out)
        return (pooled if pool else scores, e[:B].clone(), *out)

    @staticmethod
    def backward(ctx, g_out, gq, *_):
        e, offsets, A, C, Wq, *Ws = ctx.saved_tensors
        s, ps, stats, alphas = ctx.s, ctx.ps, ctx.stats, ctx.alphas
        N, Hl = s[-1].shape
        B, pool = offsets.numel() - 1, ()
        if ctx.pool is not None:  # g_scores_n = <g_p_b, k_n>; the keys' w_n g_p_b in the first layer's kernel
            pool, g_scores = (ctx.pool, g_out.contiguous()), e.new_empty(N)
            _native.pool_backward(pool[1].data_ptr(), pool[0].data_ptr(), e.data_ptr(), B, N, e.shape[1],
                                  offsets.data_ptr(), 0, g_scores.data_ptr())
        else:
            g_scores = g_out.contiguous()
        g_alpha, gv, mg, (mean, _, rstd) = e.new_empty(Hl), e.new_empty(Hl), e.new_empty(2, Hl), stats[-1]
        if Ws:  # the last Dice's first pass here; its g_s is made in the last hidden layer's backward
            g, head = g_scores, [s[-1], ps[-1], mean, rstd, alphas[-1], ctx.v, mg]
        else:
            g, head = e.new_empty(N, Hl), []
        _native.dice_backward(g_scores.data_ptr(), s[-1].data_ptr(), ps[-1].data_ptr(), N, Hl, alphas[-1].data_ptr(),
                              mean.data_ptr(), rstd.data_ptr(), True, 0 if Ws else g.data_ptr(), g_alpha.data_ptr(),
                              ctx.v.data_ptr(), gv.data_ptr(), mg.data_ptr() if Ws else 0)
        g_alphas, g_hidden, dice = [g_alpha], [], ()
        for i in reversed(range(len(Ws))):  # hidden layer i: Dice i on s[i], then Linear Ws[i]
            W, (mean, _, rstd) = Ws[i], stats[i]
            Ho, Hi = W.shape
            gy, gW, ga, mg, gb = (e.new_empty(N, Hi), e.new_empty(Ho, Hi), e.new_empty(Hi), e.new_empty(2, Hi),
                                  e.new_empty(Ho))
            Wp = _padded(W, _up16(Hi))
            _native.hidden_backward(g.data_ptr(), s[i].data_ptr(), ps[i].data_ptr(), N, Hi, mean.data_ptr(),
                                    rstd.data_ptr(), alphas[i].data_ptr(), Wp.data_ptr(), Ho, gy.data_ptr(),
                                    gW.data_ptr(), ga.data_ptr(), mg.data_ptr(), gb.data_ptr(),
                                    *([t.data_ptr() for t in head] or [0] * 7), i == 0)
            head, g_hidden = [], [gW, gb] + g_hidden
            g_alphas.insert(0, ga)  # (mg: mean g_z, mean g_z z, what Dice's g_s needs)
            if i == 0:  # made per sample in the first layer's backward
                g, dice = gy, (s[0], mean, rstd, mg)  # (gy: Dice's local part of g_s, i == 0)
            else:
                g, unused = e.new_empty(N, Hi), e.new_empty(Hi)  # (g_alpha again)
                _native.dice_backward(gy.data_ptr(), s[i].data_ptr(), ps[i].data_ptr(), N, Hi, alphas[i].data_ptr(),
                                      mean.data_ptr(), rstd.data_ptr(), True, g.data_ptr(), unused.data_ptr(), 0, 0, 0)
        ge, gA, gC, gWq, gb = _query_backward(g, gq, e, offsets, A, C, Wq, dice, pool)
        gc = g_scores.sum().reshape(ctx.c_shape)
        gW1 = torch.cat([gWq, gA, gWq - gA, gC], 1)  # W1 + W3 = Wq, W2 - W3 = A, W4 = C
        return None, None, ge, None, gW1, gb, gv.reshape(1, Hl), gc, *g_alphas, *g_hidden


def _query_layer(e, offsets, A, C, Wq, bias):
    """:class:`_QueryLayerFn`'s values, in C for float32, else in torch's ops."""
    if _native is not None and e.dtype == A.dtype == C.dtype == Wq.dtype == torch.float32:
        return _QueryLayerFn.apply(e, offsets, A, C, Wq, bias)
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
