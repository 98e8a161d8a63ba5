"""The graph models' kernels (models/_graph.c, models/ngcf.py): the CSR product, NGCF's
LeakyReLU with its hashed dropout mask, and its layer as one op, against torch's ops and
the numpy paths used where the extension is not built."""
import pytest
import torch

from data.gowalla import to_csr
from models import ngcf


@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_sparse_product_gives_torchs_values(threads, monkeypatch):
    """models/_graph.c against torch's CSR product: rows with no nonzeros, D 16 to 128, one
    and two threads (split at half the nonzeros); D not a multiple of 16 goes to torch's."""
    if ngcf._graph is None:
        pytest.skip("models._graph is not built")
    g = torch.Generator().manual_seed(0)
    N, E = 3000, 50_000
    edges = torch.randint(0, N - 100, (2, E), generator=g)  # the last 100 rows stay empty
    A = to_csr(torch.cat([edges, edges.flip(0)], 1), torch.rand(E, generator=g).repeat(2), N)
    keep = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for D in (16, 64, 128):
            x = torch.randn(N, D, generator=g)
            torch.testing.assert_close(ngcf._spmm(A, x), torch.sparse.mm(A, x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ngcf._spmm(A, x[:, :16]), torch.sparse.mm(A, x[:, :16].contiguous()),
                                       rtol=1e-5, atol=1e-5)  # a strided x (float rounding: fused multiply-adds)
        calls = []
        mm = torch.sparse.mm
        monkeypatch.setattr(torch.sparse, "mm", lambda *a: calls.append(1) or mm(*a))
        ngcf._spmm(A, torch.randn(N, 32))
        assert not calls  # the kernel's
        x = torch.randn(N, 24)
        assert torch.equal(ngcf._spmm(A, x), mm(A, x)) and calls  # torch's
    finally:
        torch.set_num_threads(keep)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_dropout_mask_is_the_same_in_c_and_numpy_for_any_thread_count(threads, monkeypatch):
    """The mask is a hash of (seed, index): the compiled kernel, split over threads, and the
    numpy path give the same kept elements and values (float64 takes the numpy path); a
    share p is dropped and the rest scaled by 1 / (1 - p); LeakyReLU's slope applies where
    z <= 0."""
    x = torch.rand(300, 400) + 1  # 120k values: two parts on two threads
    z = torch.randn(300, 400)
    keep = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, la = ngcf._leaky_drop(x, None, 0.3, 12345), ngcf._leaky_drop(x, z, 0.3, 12345)
    finally:
        torch.set_num_threads(keep)
    monkeypatch.setattr(ngcf, "_graph", None)
    b, lb = ngcf._leaky_drop(x, None, 0.3, 12345), ngcf._leaky_drop(x, z, 0.3, 12345)
    c = ngcf._leaky_drop(x.double(), None, 0.3, 12345)
    assert torch.equal(a, b) and torch.equal(c.float(), a) and torch.equal(la, lb)
    dropped = a == 0
    assert abs(dropped.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(a[~dropped], x[~dropped] / 0.7)
    torch.testing.assert_close(la, torch.where(z > 0, x, 0.2 * x) * (~dropped) / 0.7)
    assert not torch.equal(ngcf._leaky_drop(x, None, 0.3, 12346) == 0, dropped)  # another seed, another mask


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_the_ngcf_layer_as_one_op_gives_the_separate_ops_values_and_gradients(p, native, monkeypatch):
    """_NGCFLayerFn (one GEMM on [side + e, side * e], LeakyReLU and dropout in one pass)
    against LeakyReLU(W1 (side + e) + b1 + W2 (side e) + b2) times the seed's mask (torch's
    ops): values and the gradients of side, e and the four parameters."""
    if not native:
        monkeypatch.setattr(ngcf, "_graph", None)
    g = torch.Generator().manual_seed(1)
    side, e = torch.randn(700, 16, generator=g), torch.randn(700, 16, generator=g)
    ws = [torch.randn(24, 16, generator=g) / 4, torch.randn(24, generator=g), torch.randn(24, 16, generator=g) / 4,
          torch.randn(24, generator=g)]
    gout = torch.randn(700, 24, generator=g)
    seed, t = 777, round(p * 2**32)
    mask = torch.from_numpy(ngcf._keep(700 * 24, seed, t)).view(700, 24).float() / (1 - p)
    outs = []
    for fused in (True, False):
        xs = [t_.clone().requires_grad_() for t_ in (side, e, *ws)]
        s, x, W1, b1, W2, b2 = xs
        if fused:
            y = ngcf._NGCFLayerFn.apply(s, x, W1, b1, W2, b2, p, seed)
        else:
            y = torch.nn.functional.leaky_relu((s + x) @ W1.T + b1 + (s * x) @ W2.T + b2, 0.2) * mask
        y.backward(gout)
        outs.append([y.detach()] + [t_.grad for t_ in xs])
    assert (outs[0][0] == 0).any() == (p > 0)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
