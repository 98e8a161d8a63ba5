"""The lean DLRM interaction and MLP equal plain autograd layers, values and gradients."""
import pytest
import torch
from torch import nn

from models.layers import MLP, DotInteraction, mlp


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


def reference(net: MLP) -> nn.Sequential:
    """The same layers as a plain nn.Sequential (out-of-place ReLU), weights copied."""
    layers: list[nn.Module] = []
    for layer, relu in zip(net.layers, net.relu):
        lin = nn.Linear(layer.in_features, layer.out_features).double()
        lin.load_state_dict(layer.state_dict())
        layers += [lin, nn.ReLU()] if relu else [lin]
    return nn.Sequential(*layers)


def grads(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()] + ([x.grad.clone()] if x.grad is not None else [])


@pytest.mark.parametrize("last_activation", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("width", [3, 8])  # 3: the input is padded to 8 columns for the GEMMs
def test_mlp_matches_plain_layers_across_batch_sizes(last_activation, input_grad, width):
    torch.manual_seed(0)
    net = mlp([width, 8, 6, 2], last_activation=last_activation).double()
    ref = reference(net)
    for B in [7, 3, 9, 1]:  # buffers are reused when they fit, grown when not
        x = torch.randn(B, width, dtype=torch.float64, requires_grad=input_grad)
        g = torch.randn(B, 2, dtype=torch.float64)
        net.zero_grad(), ref.zero_grad()
        out = net(x)
        (out * g).sum().backward()
        got = grads(net, x)
        x.grad = None
        want = ref(x)
        (want * g).sum().backward()
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(got, grads(ref, x))
        with torch.no_grad():
            torch.testing.assert_close(net(x), want)
    x = torch.randn(5, width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,))


def test_mlp_reuses_its_buffers_and_keeps_outputs_fresh():
    net = mlp([3, 8, 8, 1])
    outs = []
    for _ in range(3):
        out = net(torch.randn(4, 3))
        out.sum().backward()
        outs.append(out.detach())
    assert len(net._free) == 1  # one set, taken and given back every step
    assert len({o.data_ptr() for o in outs}) == 3  # the caller's outputs are never overwritten


def test_mlp_two_forwards_before_one_backward():
    torch.manual_seed(1)
    net = mlp([3, 8, 6, 2]).double()
    ref = reference(net)
    a, b = (torch.randn(5, 3, dtype=torch.float64) for _ in range(2))
    (net(a).square().sum() + net(b).sum()).backward()  # the second forward takes a second set
    (ref(a).square().sum() + ref(b).sum()).backward()
    torch.testing.assert_close([p.grad for p in net.parameters()], [p.grad for p in ref.parameters()])
    assert len(net._free) == 2


def test_mlp_retained_graph_is_refused_once_its_buffers_are_reused():
    net = mlp([3, 8, 6, 2]).double()
    ref = reference(net)
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = net(x).sum()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)  # nothing reused the buffers in between: still exact
    r = ref(x).sum()
    r.backward(retain_graph=True)
    r.backward()
    torch.testing.assert_close([p.grad for p in net.parameters()], [p.grad for p in ref.parameters()])
    net(x).sum()  # takes the same buffers
    with pytest.raises(RuntimeError, match="reused by a later forward"):
        loss.backward()


def test_frozen_mlp_runs_the_plain_path():
    net = mlp([3, 8, 1]).requires_grad_(False)
    out = net(torch.randn(4, 3))
    assert not out.requires_grad and net._free == []  # no buffers taken that no backward would give back
