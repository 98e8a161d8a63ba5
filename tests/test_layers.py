"""The lean DLRM interaction equals the plain autograd one, values and gradients."""
import torch

from models.layers import DotInteraction, mlp


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """Plain autograd reference: dense and the pairwise dots i < j."""
    x = torch.cat([dense.unsqueeze(1), sparse], 1)
    z = torch.bmm(x, x.transpose(1, 2))
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    return torch.cat([dense, z[:, i, j]], 1)


def test_dot_interaction_matches_reference_across_batch_sizes():
    torch.manual_seed(0)
    layer = DotInteraction()
    for B in [7, 3, 9]:  # scratch buffers shrink and grow; stale entries must not leak
        d = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
        s = torch.randn(B, 5, 4, dtype=torch.float64, requires_grad=True)
        g = torch.randn(B, 4 + 15, dtype=torch.float64)
        out = layer(d, s)
        (out * g).sum().backward()
        got = (d.grad.clone(), s.grad.clone())
        d.grad = s.grad = None
        want = dot_interaction(d, s)
        (want * g).sum().backward()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(got, (d.grad, s.grad))
    assert torch.autograd.gradcheck(layer, (d, s))


def test_mlp_in_place_relu_keeps_gradients():
    torch.manual_seed(0)
    net = mlp([3, 8, 8, 1], last_activation=False).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,))
