"""OptEmbed's compiled row and dim masks (rectables/_masks.c) against the torch path."""
import pytest
import torch

from rectables.methods import optembed


def _skip_without_kernels():
    if optembed._kernels is None:
        pytest.skip("the C masks are not built")


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("N,D", [(300, 8), (300, 6), (2000, 16)])  # D = 16: the vector path; 2000 x 5 rows: 2 threads
def test_compiled_masks_equal_the_torch_path(ste, N, D):
    _skip_without_kernels()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(N, 5, D, generator=gen) * 0.2
    v[7, 2] = 0  # a zero row: never kept
    v[8, :, 1] = 0  # zero values in kept rows: sign 0, no straight-through term there
    th = torch.randn(5, generator=gen).abs()
    dims = torch.randint(1, D + 1, (N, 5), generator=gen)
    g = torch.randn(N, 5, D, generator=gen)
    outs = []
    for native in (True, False):
        vv, tt = v.clone().requires_grad_(), th.clone().requires_grad_()
        out = optembed.MaskRows.apply(vv, tt, dims, ste, native)
        out.backward(g)
        outs.append((out.detach(), vv.grad, tt.grad))
    (a, ga, ta), (b, gb, tb) = outs
    assert torch.equal(a, b) and (a[7, 2] == 0).all()
    kept = (torch.arange(D) < dims.unsqueeze(2)) & (v.abs().sum(2) > th).unsqueeze(2)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    if ste:
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)
        assert (ga != g * kept).any()  # the straight-through terms are there
        assert torch.equal(ga[8, :, 1], (g * kept)[8, :, 1])  # but none where a value is 0 (its sign)
    else:
        assert ta is None and tb is None and torch.equal(ga, g * kept)


def test_compiled_masks_give_the_same_bits_on_one_thread_as_on_two():
    """The C masks split rows over torch's OpenMP workers; with torch on one thread they
    run both halves on the caller's thread, in the same order: identical results."""
    _skip_without_kernels()
    gen = torch.Generator().manual_seed(1)
    v, th = torch.randn(2000, 5, 16, generator=gen) * 0.2, torch.randn(5, generator=gen).abs()
    dims, g = torch.randint(1, 17, (2000, 5), generator=gen), torch.randn(2000, 5, 16, generator=gen)
    outs, before = [], torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            vv, tt = v.clone().requires_grad_(), th.clone().requires_grad_()
            out = optembed.MaskRows.apply(vv, tt, dims, True, True)
            out.backward(g)
            outs.append((out.detach(), vv.grad, tt.grad))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(*outs))
