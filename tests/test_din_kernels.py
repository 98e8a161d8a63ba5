"""DIN's ops and their C kernels (models/din_ops.py, models/_din*.c) against the torch
functions that give the same values: Dice, the first attention layer, pooling, and the
attention MLP as one op (with and without pooling)."""
import pytest
import torch

from models.din import Dice, _DiceFn, _PoolFn, _query_layer


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("with_head", [False, True])
def test_dice_backward_is_the_gradient_of_its_forward(batch_stats, with_head):
    torch.manual_seed(0)
    s = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    v, c = torch.randn(1, 3, dtype=torch.float64, requires_grad=True), torch.randn(1, dtype=torch.float64,
                                                                                 requires_grad=True)
    stats = None if batch_stats else (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)

    def f(s, alpha, v, c):  # with batch statistics, they are functions of s: the backward must go through them
        return _DiceFn.apply(s, alpha, v if with_head else None, c if with_head else None, stats, 1e-8)[0]
    assert torch.autograd.gradcheck(f, (s, alpha, v, c))  # float64: the torch path


def _dice_run(x, with_head, training, native):
    from models import din_ops as din_module

    keep = din_module._native
    din_module._native = keep if native else None
    try:
        torch.manual_seed(0)
        d, head = Dice(x.shape[1]), torch.nn.Linear(x.shape[1], 1) if with_head else None
        d.alpha.data.uniform_(-0.5, 0.5)
        d.train(training)
        xi = x.clone().requires_grad_()
        y = d(xi, head)
        (y * torch.linspace(-1, 1, y.shape[1]) * torch.linspace(2, -1, y.shape[0])[:, None]).sum().backward()
        out = [y.detach(), xi.grad, d.alpha.grad, d.running_mean, d.running_var]
        return out + ([head.weight.grad, head.bias.grad] if with_head else [])
    finally:
        din_module._native = keep


def test_din_kernels_are_built():
    from models import din_ops as din_module

    assert din_module._native is not None, "models/_din.c was not built (pip install -e .)"


@pytest.mark.parametrize("rows", [50, 9000])  # one thread; two (rows split in halves)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("width", [40, 7])  # rows of 40 in blocks of 80 values; of 7 in blocks of 112
def test_dice_kernels_give_the_torch_values_and_gradients(rows, training, with_head, width):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, width, generator=g) * 3 + 1
    got, want = _dice_run(x, with_head, training, True), _dice_run(x, with_head, training, False)
    assert len(got) == (7 if with_head else 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_dice_refuses_shapes_its_kernels_would_read_past():
    d = Dice(4)
    with pytest.raises(ValueError, match=r"Dice\(4\) takes \[N, 4\]"):
        d(torch.randn(10, 5))
    for head in (torch.nn.Linear(4, 2), torch.nn.Linear(5, 1), torch.nn.Linear(4, 1, bias=False)):
        with pytest.raises(ValueError, match=r"Dice\(4\) fuses a Linear\(4, 1\) head"):
            d(torch.randn(10, 4), head)
    head = torch.nn.Linear(4, 1)
    x = torch.randn(10, 4)
    d.eval()  # the fused head gives what the head gives on Dice's output
    torch.testing.assert_close(d(x, head), head(d(x)))


def test_dice_kernels_keep_a_nan():
    x = torch.randn(5000, 8)
    x[7, 3] = float("nan")
    for training in (True, False):
        y = _dice_run(x, False, training, True)[0]
        assert y[7, 3].isnan() and (y[:, 3].isnan().all() if training else y[:, 3].isnan().sum() == 1)
        assert not y[:, [0, 1, 2, 4, 5, 6, 7]].isnan().any()


def _offsets(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])


def test_query_layer_and_pooling_backward_is_their_gradient():
    torch.manual_seed(0)
    offsets = _offsets([2, 0, 3])
    e = torch.randn(3 + 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    W1, W2, W3, W4 = (torch.randn(6, 4, dtype=torch.float64) for _ in range(4))
    A, C, Wq = (t.requires_grad_() for t in (W2 - W3, W4.clone(), W1 + W3))
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    # float64: the torch paths
    assert torch.autograd.gradcheck(lambda *a: _query_layer(e, offsets, *a), (A, C, Wq, bias))
    assert torch.autograd.gradcheck(lambda e, w: _PoolFn.apply(e, w, offsets), (e, w))
    s, q = _query_layer(e, offsets, A, C, Wq, bias)  # key 2 is in segment 2: the layer on [q, k, q - k, q k]
    k, qq = e[3 + 2], e[2]
    torch.testing.assert_close(s[2], torch.cat([W1, W2, W3, W4], 1) @ torch.cat([qq, k, qq - k, qq * k]) + bias)
    assert torch.equal(q, e[:3])
    p = _PoolFn.apply(e, w, offsets)
    assert torch.equal(p[1], torch.zeros(4, dtype=torch.float64))  # an empty history pools to zeros
    torch.testing.assert_close(p[2], (w[2:, None] * e[5:]).sum(0))


@pytest.mark.parametrize("rows", [30, 9000])  # one thread; two
@pytest.mark.parametrize("dim, width", [(32, 80), (12, 36)])  # whole vectors; padded keys and units
def test_query_layer_and_pool_kernels_give_the_torch_values_and_gradients(rows, dim, width):
    from models import din_ops as din_module

    g = torch.Generator().manual_seed(2)
    lengths = [0, 0] + [int(n) for n in torch.randint(0, 9, (rows,), generator=g)]
    lengths = [n for n, c in zip(lengths, torch.tensor(lengths).cumsum(0)) if c <= rows] + [0]
    lengths[-1] = rows - sum(lengths)
    offsets = _offsets(lengths)
    e = torch.randn(len(lengths) + rows, dim, generator=g)
    w = torch.randn(rows, generator=g)
    weights = [torch.randn(width, dim, generator=g) for _ in range(3)] + [torch.randn(width, generator=g)]
    gs, gq, gp = (torch.randn(rows, width, generator=g), torch.randn(len(lengths), dim, generator=g),
                  torch.randn(len(lengths), dim, generator=g))
    outs = []
    keep = din_module._native
    for native in (True, False):
        din_module._native = keep if native else None
        try:
            ei, wi = e.clone().requires_grad_(), w.clone().requires_grad_()
            ws = [t.clone().requires_grad_() for t in weights]
            s, q = _query_layer(ei, offsets, *ws)
            p = _PoolFn.apply(ei, wi, offsets)
            torch.autograd.backward([s, q, p], [gs, gq, gp])
            outs.append([s.detach(), q.detach(), p.detach(), ei.grad, wi.grad] + [t.grad for t in ws])
        finally:
            din_module._native = keep
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("rows", [30, 9000])  # one thread; two
@pytest.mark.parametrize("dim, widths", [(32, (80, 40)), (12, (36, 20, 7)), (8, (24,))])
def test_attention_as_one_op_gives_the_torch_values_and_gradients(rows, dim, widths):
    """DIN's attention MLP with Dice in training as one op (statistics summed in the layers'
    kernels, Dice fused into the next Linear, the first Dice's g_s made per sample) against
    the separate ops in torch: the default 80-40, padded widths with two hidden Linears, one
    Dice only."""
    from models import din_ops

    g = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(0, 9, (rows,), generator=g)]
    lengths = [n for n, c in zip(lengths, torch.tensor(lengths).cumsum(0)) if c <= rows] + [0]
    lengths[-1] = rows - sum(lengths)
    offsets = _offsets(lengths)
    e = torch.randn(len(lengths) + rows, dim, generator=g)
    first = [torch.randn(widths[0], 4 * dim, generator=g) * 0.3, torch.randn(widths[0], generator=g)]  # on [q, k, q-k, qk]
    alphas = [torch.rand(w, generator=g) - 0.5 for w in widths]
    hidden = [t for a, b in zip(widths, widths[1:]) for t in (torch.randn(b, a, generator=g) / a**0.5, torch.randn(b))]
    head = [torch.randn(1, widths[-1], generator=g), torch.randn(1, generator=g)]
    gout, gq = torch.randn(rows, generator=g), torch.randn(len(lengths), dim, generator=g)
    eps = tuple(1e-8 * (i + 1) for i in range(len(widths)))
    outs = []
    for native in (True, False):
        ei = e.clone().requires_grad_()
        ws = [t.clone().requires_grad_() for t in first + head + alphas + hidden]
        if native:
            scores, q, *stats = din_ops._AttentionFn.apply(eps, False, ei, offsets, *ws)
        else:
            keep, din_ops._native = din_ops._native, None
            try:
                W1, W2, W3, W4 = ws[0].split(dim, 1)
                h, q = _query_layer(ei, offsets, W2 - W3, W4, W1 + W3, ws[1])
                stats = []
                for i, a in enumerate(ws[4 : 4 + len(widths)]):
                    W, b = (ws[4 + len(widths) + 2 * i], ws[5 + len(widths) + 2 * i]) if i + 1 < len(widths) else ws[2:4]
                    h, mean, var = _DiceFn.apply(h, a, W if i + 1 == len(widths) else None,
                                                 b if i + 1 == len(widths) else None, None, eps[i])
                    h, stats = (h if i + 1 == len(widths) else h @ W.T + b), stats + [mean, var]
                scores = h
            finally:
                din_ops._native = keep
        torch.autograd.backward([scores, q], [gout, gq])
        outs.append([scores.detach(), q.detach(), *stats, ei.grad] + [t.grad for t in ws])
    assert len(outs[0]) == 2 + 2 * len(widths) + 1 + 4 + len(widths) + 2 * (len(widths) - 1)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("rows", [30, 9000])  # one thread; two
@pytest.mark.parametrize("dim, widths", [(32, (80, 40)), (8, (24,))])
def test_attention_op_that_pools_gives_the_values_and_gradients_of_pooling_after_it(rows, dim, widths):
    """With pool, the attention op returns the histories pooled by its scores, and the keys'
    pooling gradients join the first layer's in its kernel: the same values and gradients as
    the op's scores pooled by :class:`_PoolFn` (empty histories included)."""
    from models import din_ops

    g = torch.Generator().manual_seed(5)
    lengths = [int(n) for n in torch.randint(0, 9, (rows,), generator=g)]
    lengths = [n for n, c in zip(lengths, torch.tensor(lengths).cumsum(0)) if c <= rows] + [0, 0]
    lengths[-2] = rows - sum(lengths)
    offsets = _offsets(lengths)
    e = torch.randn(len(lengths) + rows, dim, generator=g)
    ws = [torch.randn(widths[0], 4 * dim, generator=g) * 0.3, torch.randn(widths[0], generator=g),
          torch.randn(1, widths[-1], generator=g), torch.randn(1, generator=g)] + \
        [torch.rand(w, generator=g) - 0.5 for w in widths] + \
        [t for a, b in zip(widths, widths[1:]) for t in (torch.randn(b, a, generator=g) / a**0.5, torch.randn(b))]
    gp, gq = torch.randn(len(lengths), dim, generator=g), torch.randn(len(lengths), dim, generator=g)
    eps = tuple(1e-8 for _ in widths)
    outs = []
    for fused in (True, False):
        ei, wi = e.clone().requires_grad_(), [t.clone().requires_grad_() for t in ws]
        out, q, *_ = din_ops._AttentionFn.apply(eps, fused, ei, offsets, *wi)
        pooled = out if fused else din_ops._PoolFn.apply(ei, out, offsets)
        torch.autograd.backward([pooled, q], [gp, gq])
        outs.append([pooled.detach(), ei.grad] + [t.grad for t in wi])
    assert outs[0][0].shape == (len(lengths), dim) and not outs[0][0][-1].any()  # (the empty history)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_attention_op_keeps_the_contiguous_copy_of_a_strided_query_gradient():
    """The queries' gradient arrives strided in DIN (q is concatenated with the pooled
    histories; the concatenation's backward hands out a view): the op makes it contiguous
    and must hold that copy while its kernel reads it.  The copy here is 37 MB, so a copy
    dropped at once is unmapped before the read (read that way, these gradients differed,
    and DIN's MovieLens loss moved from run to run).  Strided and contiguous must give the
    same gradients."""
    from models import din_ops

    g = torch.Generator().manual_seed(6)
    B, D, H = 36_000, 256, 8  # (B D floats > glibc's 32 MiB: always mapped, unmapped when freed)
    offsets = _offsets([3] * 50 + [0] * (B - 50))
    e = torch.randn(B + 150, D, generator=g)
    ws = [torch.randn(H, 4 * D, generator=g) * 0.1, torch.randn(H, generator=g), torch.randn(1, H, generator=g),
          torch.randn(1, generator=g), torch.rand(H, generator=g) - 0.5]
    wide = torch.randn(B, 2 * D, generator=g)
    grads = []
    for gq in (wide[:, :D], wide[:, :D].contiguous()):
        ei = e.clone().requires_grad_()
        pooled, q, *_ = din_ops._AttentionFn.apply((1e-8,), True, ei, offsets, *ws)
        assert not gq.is_contiguous() or len(grads)
        torch.autograd.backward([pooled, q], [torch.ones_like(pooled), gq])
        grads.append(ei.grad)
    assert torch.equal(grads[0], grads[1])
