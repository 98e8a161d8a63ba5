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


class _Arena:
    """Float buffers carved from one tensor, 64-byte aligned: `take` them all first (offsets),
    then `alloc` once, then `ptr` gives each one's address for the kernels."""

    def __init__(self):
        self.total = 0

    def take(self, n: int) -> int:
        at, self.total = self.total, self.total + _up16(n)
        return at

    def alloc(self, like: torch.Tensor) -> "_Arena":
        self.tensor = like.new_empty(self.total + 16)  # (+16: room to align the base)
        self.base = -(-self.tensor.data_ptr() // 64) * 64
        return self

    def ptr(self, at: int) -> int:
        return self.base + 4 * at


class _AttentionFn(torch.autograd.Function):
    """DIN's attention MLP in training with Dice on every hidden layer, as one op:
    forward(eps, pool, e, offsets, W [H, 4 De], bias, head v [1, H], c [1], *alphas, *hidden)
    -> (scores [N], or with pool the keys pooled by them, p_b = sum of w_n k_n [B, De] (as
    :class:`_PoolFn`, whose key gradients then join the first layer's in its kernel: no
    second [B + N, De] gradient to add); q = e[:B]; then each Dice's batch mean and biased
    var [H] (no grad)), where the first layer (W, bias) is computed as
    :class:`_QueryLayerFn`'s (A, C and Wq formed from W's blocks in C: no autograd ops for
    them), ``alphas`` and ``eps`` (a tuple) are the k + 1 Dice layers', ``hidden`` the
    weights and biases of the k Linear layers between them (W, b, W, b ...).
    - first layer: its kernel also sums the first Dice's statistics as it writes s;
    - each hidden layer (models/_din_hidden.c): that Dice, then the Linear, a block of rows
      at a time (Dice's output never written), summing the next Dice's statistics;
    - the last Dice fused with the Linear(H, 1) head (as :class:`_DiceFn`).
    Backward in the same steps, the other way: the first Dice's g_s is split at its batch
    statistics, the local part made in the first hidden layer's backward (where its p and
    output gradient are read anyway) and finished per sample in the first layer's from s
    alone; the last Dice's a block of rows at a time in the last hidden layer's (any Dice
    between by its own kernel).  Default (80-40): 3 passes over [N, 80] or [N, 40] forward
    where the separate ops made 7, and no GEMM in torch's.  The buffers between the kernels
    are carved from one tensor each way (:class:`_Arena`) and the weight blocks made in
    models/_din_weights.c: 15 torch calls forward and 16 backward where a call per buffer and
    block made 40 and 39 (outermost ops, torch's profiler; DIN's step 24.26 -> 23.72, 24.85
    -> 24.43 and 24.56 -> 24.40 ms, interleaved A/B of 600, 600 and 300 steps)."""

    @staticmethod
    def forward(ctx, eps, pool, e, offsets, W1, bias, v, c, *rest):
        k = (len(rest) - 1) // 3
        alphas = [a.detach().contiguous() for a in rest[: k + 1]]
        hidden = [t.detach().contiguous() for t in rest[k + 1 :]]
        B, e = offsets.numel() - 1, e.contiguous()
        N, De = e.shape[0] - B, e.shape[1]
        H = [W1.shape[0]] + [W.shape[0] for W in hidden[::2]]
        W1, bias, vd, cd = (t.detach().contiguous() for t in (W1, bias, v, c))
        ar, Dp = _Arena(), _up16(De)
        At, Ct = ar.take(De * _up16(H[0])), ar.take(De * _up16(H[0]))  # A, C transposed: the forward's
        Ap, Cp, Wq = ar.take(H[0] * Dp), ar.take(H[0] * Dp), ar.take(H[0] * Dp)  # padded: the backward's
        cq = ar.take(B * H[0])
        s = [ar.take(N * h) for h in H]
        p = [ar.take(N * h) for h in H]
        Wt = [ar.take(Hi * _up16(Ho)) for Hi, Ho in zip(H, H[1:])]
        bp = [ar.take(_up16(Ho)) for Ho in H[1:]]
        st = e.new_empty(3 * sum(H))  # each Dice's mean, biased var, rstd [3, H]: made in the kernels
        ar.alloc(e)
        P, sp = ar.ptr, [st.data_ptr() + 4 * 3 * sum(H[:i]) for i in range(len(H))]
        _native.query_prep(W1.data_ptr(), bias.data_ptr(), e.data_ptr(), B, De, H[0], *map(P, (At, Ct, Ap, Cp, Wq, cq)))
        _native.query_forward(e.data_ptr(), B, N, De, offsets.data_ptr(), P(At), P(Ct), P(cq), H[0], P(s[0]),
                              sp[0], eps[0])
        for i, (W, b) in enumerate(zip(hidden[::2], hidden[1::2])):
            Hi, Ho = H[i], H[i + 1]
            _native.pad_matrix(W.data_ptr(), Ho, Hi, True, P(Wt[i]), _up16(Ho))
            _native.pad_matrix(b.data_ptr(), 1, Ho, False, P(bp[i]), _up16(Ho))
            _native.hidden_forward(P(s[i]), N, Hi, sp[i], sp[i] + 8 * Hi, alphas[i].data_ptr(), P(Wt[i]), P(bp[i]), Ho,
                                   P(p[i]), P(s[i + 1]), sp[i + 1], eps[i + 1])
        scores = e.new_empty(N)
        _native.dice_forward(P(s[-1]), N, H[-1], alphas[-1].data_ptr(), sp[-1], sp[-1] + 8 * H[-1], 0,
                             scores.data_ptr(), P(p[-1]), vd.data_ptr(), cd.data_ptr(), eps[-1], False)
        if pool:
            pooled = e.new_empty(B, De)
            _native.pool_forward(0, scores.data_ptr(), e.data_ptr(), B, N, De, offsets.data_ptr(), pooled.data_ptr(), 0)
        ctx.save_for_backward(e, offsets)
        ctx.arena, ctx.st, ctx.scores, ctx.pool = ar, st, scores, pool  # (kept: the backward reads them by address)
        ctx.at = (Ap, Cp, Wq, s, p, sp, H, alphas, hidden, vd, c.shape)
        stats = st.split([h for h in H for _ in range(3)])
        out = [t for i in range(len(H)) for t in stats[3 * i : 3 * i + 2]]
        ctx.mark_non_differentiable(*out)
        return (pooled if pool else scores, e[:B].clone(), *out)

    @staticmethod
    def backward(ctx, g_out, gq, *_):
        e, offsets = ctx.saved_tensors
        Ap, Cp, Wq, s, p, sp, H, alphas, hidden, vd, c_shape = ctx.at
        P, Ws, L = ctx.arena.ptr, hidden[::2], len(H)
        B, De = offsets.numel() - 1, e.shape[1]
        N, Hl = e.shape[0] - B, H[-1]
        ga = _Arena()  # intermediates: the last Dice's mg; per hidden layer g_y, mg, W padded; g_c, g_A, g_C
        mgl, gy, mg, Wp = ga.take(2 * Hl), [ga.take(N * h) for h in H[:-1]], [ga.take(2 * h) for h in H[:-1]], \
            [ga.take(Ho * _up16(Hi)) for Hi, Ho in zip(H, H[1:])]
        gcq, gA, gC = ga.take(B * H[0]), ga.take(H[0] * De), ga.take(H[0] * De)
        if len(Ws) != 1:  # a Dice's whole g_s [N, H] (no hidden layer: the only one's; else those between)
            gfull, unused = ga.take(N * max(H)), ga.take(max(H))
        ga.alloc(e)
        Q = ga.ptr
        # the parameters' gradients (c's: the sum of g_scores, below), views of one tensor: W1, bias, v,
        # the alphas, then the hidden layers' W, b
        sizes = [H[0] * 4 * De, H[0], Hl, *H, *(n for Hi, Ho in zip(H, H[1:]) for n in (Ho * Hi, Ho))]
        gW1, gb1, gv, *grads = e.new_empty(sum(sizes)).split(sizes)
        g_alphas, g_hidden = grads[:L], grads[L:]
        ge = torch.empty_like(e)
        if ctx.pool:  # g_scores_n = <g_p_b, k_n>; the keys' w_n g_p_b in the first layer's kernel
            gp, gst = g_out.contiguous(), e.new_empty(N)
            pool = (ctx.scores.data_ptr(), gp.data_ptr())
            _native.pool_backward(gp.data_ptr(), ctx.scores.data_ptr(), e.data_ptr(), B, N, De, offsets.data_ptr(), 0,
                                  gst.data_ptr())
        else:
            gst, pool = g_out.contiguous(), (0, 0)
        g_scores = gst.data_ptr()
        mean, rstd = sp[-1], sp[-1] + 8 * Hl
        head = [P(s[-1]), P(p[-1]), mean, rstd, alphas[-1].data_ptr(), vd.data_ptr(), Q(mgl)] if Ws else [0] * 7
        _native.dice_backward(g_scores, P(s[-1]), P(p[-1]), N, Hl, alphas[-1].data_ptr(), mean, rstd, True,
                              0 if Ws else Q(gfull), g_alphas[-1].data_ptr(), vd.data_ptr(), gv.data_ptr(),
                              Q(mgl) if Ws else 0)
        g, dice = (g_scores if Ws else Q(gfull)), [0] * 4
        for i in reversed(range(len(Ws))):  # hidden layer i: Dice i on s[i], then Linear Ws[i]
            Ho, Hi = H[i + 1], H[i]
            mean, rstd = sp[i], sp[i] + 8 * Hi
            _native.pad_matrix(Ws[i].data_ptr(), Ho, Hi, False, Q(Wp[i]), _up16(Hi))
            _native.hidden_backward(g, P(s[i]), P(p[i]), N, Hi, mean, rstd, alphas[i].data_ptr(), Q(Wp[i]), Ho,
                                    Q(gy[i]), g_hidden[2 * i].data_ptr(), g_alphas[i].data_ptr(), Q(mg[i]),
                                    g_hidden[2 * i + 1].data_ptr(), *head, i == 0)
            head = [0] * 7  # (mg: mean g_z, mean g_z z, what Dice's g_s needs)
            if i == 0:  # made per sample in the first layer's backward (gy: Dice's local part of g_s)
                g, dice = Q(gy[0]), [P(s[0]), mean, rstd, Q(mg[0])]
            else:
                g = Q(gfull)
                _native.dice_backward(Q(gy[i]), P(s[i]), P(p[i]), N, Hi, alphas[i].data_ptr(), mean, rstd, True, g,
                                      Q(unused), 0, 0, 0)
        _native.query_backward(g, e.data_ptr(), B, N, De, offsets.data_ptr(), P(Ap), P(Cp), H[0], ge.data_ptr(), Q(gcq),
                               Q(gA), Q(gC), *dice, *pool)
        gq = None if gq is None else gq.contiguous()  # (named: a temporary's memory would be freed before the read)
        _native.query_finish(Q(gcq), e.data_ptr(), B, De, H[0], P(Wq), 0 if gq is None else gq.data_ptr(),
                             ge.data_ptr(), Q(gA), Q(gC), gW1.data_ptr(), gb1.data_ptr())
        shapes = [s for Hi, Ho in zip(H, H[1:]) for s in ((Ho, Hi), (Ho,))]
        return (None, None, ge, None, gW1.view(H[0], 4 * De), gb1, gv.view(1, Hl), gst.sum().reshape(c_shape),
                *g_alphas, *(t.view(shape) for t, shape in zip(g_hidden, shapes)))


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
