"""``full`` against dumb references with copied weights (forward and after one update)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rectables
from tests.helpers import random_kjt, weights


def _full(features, num_ids, dim, pooling="sum", optimizer="sgd", lr=0.1):
    tables = [
        rectables.create_table("full", name=f"t_{f}", embedding_dim=dim, feature_names=[f], num_ids=num_ids, pooling=pooling)
        for f in features
    ]
    return rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer(optimizer, lr=lr))


def _reference(ebc, kjt, features, pooling):
    """Per-feature nn.EmbeddingBag with the same weights; returns (out [B, F*D], bags)."""
    bags, outs = [], []
    for k, f in enumerate(features):
        w = ebc.storage.weight(k).clone()
        bag = torch.nn.EmbeddingBag(w.shape[0], w.shape[1], mode=pooling, sparse=True)
        bag.weight.data.copy_(w)
        jt = kjt[f]
        outs.append(bag(jt.values(), jt.offsets()[:-1]))
        bags.append(bag)
    return torch.cat(outs, 1), bags


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 6), F=st.integers(1, 4), L=st.integers(0, 4),
    D=st.sampled_from([4, 8, 12, 16, 64]), pooling=st.sampled_from(["sum", "mean"]), seed=st.integers(0, 2**16),
)
def test_full_equals_embeddingbag_forward_and_sgd_step(B, F, L, D, pooling, seed):
    torch.manual_seed(seed)
    feats = [f"f{i}" for i in range(F)]
    kjt = random_kjt(feats, B, L, num_ids=20, gen=torch.Generator().manual_seed(seed))
    ebc = _full(feats, 20, D, pooling, lr=0.5)
    ref, bags = _reference(ebc, kjt, feats, pooling)
    out = ebc(kjt).values()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for k, bag in enumerate(bags):
        want = bag.weight.detach() - 0.5 * bag.weight.grad.to_dense()
        torch.testing.assert_close(ebc.storage.weight(k), want, rtol=1e-5, atol=1e-6)


def _one_step_reference(w, rows_ids, grad_rows, opt):
    """Dense reference of one step of each sparse optimizer on [M, D] weights."""
    g = torch.zeros_like(w).index_add_(0, rows_ids, grad_rows)
    touched = torch.zeros(w.shape[0], dtype=torch.bool)
    touched[rows_ids] = True
    if opt.name == "adagrad":
        s = g * g
        step = opt.lr * g / (s.sqrt() + opt.eps)
    elif opt.name == "rowwise_adagrad":
        s = (g * g).mean(1, keepdim=True)
        step = opt.lr * g / (s.sqrt() + opt.eps)
    elif opt.name == "adam":
        m = (1 - opt.beta1) * g
        v = (1 - opt.beta2) * (g * g).mean(1, keepdim=True)
        step = opt.lr * (m / (1 - opt.beta1)) / ((v / (1 - opt.beta2)).sqrt() + opt.eps)
    else:
        step = opt.lr * g
    return torch.where(touched.unsqueeze(1), w - step, w)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_optimizers_match_reference_one_step(name):
    torch.manual_seed(0)
    feats = ["a", "b"]
    kjt = random_kjt(feats, 8, 3, num_ids=12)
    ebc = _full(feats, 12, 4, optimizer=name, lr=0.05)
    before = [ebc.storage.weight(k).clone() for k in range(2)]
    out = ebc(kjt).values()
    g = torch.randn_like(out)
    (out * g).sum().backward()
    for k, f in enumerate(feats):
        jt = kjt[f]
        bag = torch.repeat_interleave(torch.arange(8), jt.lengths())
        grad_rows = g[:, 4 * k : 4 * k + 4][bag]
        want = _one_step_reference(before[k], jt.values(), grad_rows, ebc.storage.optimizer)
        torch.testing.assert_close(ebc.storage.weight(k), want, rtol=1e-4, atol=1e-6)


def test_adam_keeps_moments_across_steps():
    torch.manual_seed(0)
    kjt = random_kjt(["a"], 4, 2, num_ids=5)
    ebc = _full(["a"], 5, 4, optimizer="adam", lr=0.01)
    for _ in range(3):
        ebc(kjt).values().sum().backward()
    assert int(ebc.storage.adam_step) == 3
    st = ebc.storage.optimizer_state(0)
    used = torch.unique(kjt.values())
    assert (st["exp_avg_sq"][used] > 0).all()
    unused = torch.ones(5, dtype=torch.bool)
    unused[used] = False
    assert (st["exp_avg"][unused] == 0).all()


def test_no_dense_gradient_for_tables():
    kjt = random_kjt(["a"], 4, 2)
    ebc = _full(["a"], 300, 4)
    w0 = weights(ebc)
    ebc(kjt).values().sum().backward()
    assert all(p.grad is None or p.numel() == 0 for p in ebc.parameters())
    assert not torch.equal(w0, weights(ebc))
    assert rectables.dense_parameters(ebc) == []


@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad", "adam"])
def test_reset_rows_reinitialises_rows_and_zeroes_their_state(name):
    torch.manual_seed(0)
    kjt = random_kjt(["a"], 16, 3, num_ids=10)
    ebc = _full(["a"], 10, 4, optimizer=name)
    ebc(kjt).values().sum().backward()
    st = ebc.storage
    before = st.weight(0).clone()
    states = {k: v.clone() for k, v in st.optimizer_state(0).items()}
    rows = torch.tensor([1, 4])
    st.reset_rows(0, rows, torch.empty(2, 4).uniform_(-1e-3, 1e-3))
    keep = torch.ones(10, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(st.weight(0)[keep], before[keep])
    assert (st.weight(0)[rows].abs() <= 1e-3).all() and not torch.equal(st.weight(0)[rows], before[rows])
    for k, v in st.optimizer_state(0).items():
        assert (v[rows] == 0).all() and torch.equal(v[keep], states[k][keep])
        assert states[k][rows].abs().sum() > 0  # they were touched before the reset
