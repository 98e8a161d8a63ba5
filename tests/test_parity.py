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


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["sgd", "adagrad", "rowwise_adagrad", "adam"]), seed=st.integers(0, 2**16),
       B=st.integers(0, 9), L=st.integers(0, 5), weighted=st.booleans(), threads=st.sampled_from([1, 2]))
def test_compiled_update_matches_fbgemms_backward(name, seed, B, L, weighted, threads):
    """The compiled kernel's update (rectables/_rowupdate.c) against fbgemm's own backward
    (Adam: against the torch path, rectables.optim.sparse_adam_step) on a copy: tables of dims 6 (stored 8) and 4, lanes out of table order, two lanes of one
    table (their ids' gradients summed per row), repeated ids, per-id weights, two steps."""
    from rectables.storage import FusedStorage

    if not FusedStorage([(3, 4)], [0], rectables.SparseOptimizer(name))._native:
        pytest.skip("the compiled update is not built")
    gen = torch.Generator().manual_seed(seed)
    shapes, lanes = [(7, 6), (40, 4), (5, 4)], [1, 0, 1, 2]
    pair = [FusedStorage(shapes, lanes, rectables.SparseOptimizer(name, lr=0.3)) for _ in range(2)]
    pair[1]._native = False  # fbgemm's backward; Adam's torch path
    pair[1].tbe.weights_host.detach().copy_(pair[0].tbe.weights_host.detach())
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            lengths = torch.randint(0, L + 1, (len(lanes) * B,), generator=gen)
            n = int(lengths.sum())
            ids = torch.cat([torch.randint(0, shapes[k][0], (int(c),), generator=gen)
                             for k, c in zip(lanes, lengths.view(len(lanes), -1).sum(1))])
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            w = torch.rand(n, generator=gen) + 0.5 if weighted else None
            g = torch.randn(B, 4 + 6 + 4 + 4, generator=gen)
            for s in pair:
                s(ids, offsets, w).backward(g)
    finally:
        torch.set_num_threads(2)
    ours, theirs = pair
    for k in range(len(shapes)):
        torch.testing.assert_close(ours.weight(k), theirs.weight(k), rtol=1e-5, atol=1e-6)
        for key, t in ours.optimizer_state(k).items():
            torch.testing.assert_close(t, theirs.optimizer_state(k)[key], rtol=1e-5, atol=1e-7)
    assert not ours._stored(0)[:, 6:].any()  # the padding of dim 6 stays zero


def test_training_lookups_use_the_compiled_update_unless_weights_take_a_gradient():
    from rectables.storage import FusedStorage

    st_ = FusedStorage([(10, 4)], [0], rectables.SparseOptimizer("rowwise_adagrad"))
    if not st_._native:
        pytest.skip("the compiled update is not built")
    st_.weight(0).copy_(torch.randn(10, 4))
    ids, offsets = torch.tensor([1, 2, 2]), torch.tensor([0, 2, 3])
    assert type(st_(ids, offsets).grad_fn).__name__ == "_OwnUpdateBackward"
    w = torch.ones(3, requires_grad=True)
    out = st_(ids, offsets, w)
    assert type(out.grad_fn).__name__ != "_OwnUpdateBackward"
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_compiled_update_with_an_empty_table_sharing_the_next_ones_offsets():
    """A table of 0 rows has the same offsets as the next table and another width: the
    update still lands on the rows read (fbgemm's own backward moves other rows here)."""
    from rectables.storage import FusedStorage

    st_ = FusedStorage([(0, 8), (5, 4)], [0, 1], rectables.SparseOptimizer("rowwise_adagrad", lr=0.3))
    if not st_._native:
        pytest.skip("the compiled update is not built")
    w0 = torch.arange(20.0).view(5, 4) / 10
    st_.weight(1).copy_(w0)
    ids, offsets = torch.tensor([1, 3, 3]), torch.tensor([0, 0, 0, 1, 3])  # lane 0 (empty table): no ids
    g = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    st_(ids, offsets).backward(g)
    want = _one_step_reference(w0, ids, g[[0, 1, 1], 8:], st_.optimizer)
    torch.testing.assert_close(st_.weight(1), want)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_id_bags_are_looked_up_in_the_compiled_kernel_with_fbgemms_values(threads):
    """Sequence lookups (every bag one id or none, no weights) copy the rows in
    rectables/_rowupdate.c (lanes out of table order, two lanes of one table, a dim stored
    padded, empty bags as zeros): the values of fbgemm's forward, with and without autograd;
    other bags, and an id that is no row, go to fbgemm."""
    from rectables import storage as storage_module
    from rectables.storage import FusedStorage

    shapes, lanes = [(7, 6), (40, 4), (5, 4)], [1, 0, 1, 2]
    st_ = FusedStorage(shapes, lanes, rectables.SparseOptimizer("rowwise_adagrad"))
    if not st_._native:
        pytest.skip("the compiled kernels are not built")
    for k, (m, d) in enumerate(shapes):
        st_.weight(k).copy_(torch.randn(m, d))
    fbgemm = st_.tbe.forward
    gen = torch.Generator().manual_seed(0)
    torch.set_num_threads(threads)
    try:
        # one id a bag (two threads from 4096 ids), one or none, several, two or none (fewer ids than bags), none
        for B, L in [(3000, 1), (3000, None), (3, 1), (5, 2), (300, -2), (4, 0)]:
            some = (torch.rand(len(lanes) * B, generator=gen) < (0.5 if L is None else 0.3)).long()
            lengths = torch.full((len(lanes) * B,), L) if L is not None and L >= 0 else some * (1 if L is None else 2)
            per_lane = lengths.view(len(lanes), B).sum(1).tolist()
            ids = torch.cat([torch.randint(0, shapes[k][0], (n,), generator=gen) for k, n in zip(lanes, per_lane)])
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            st_._native = False
            want = st_(ids, offsets).detach()
            st_._native = True
            if L in (1, None):  # fbgemm must not be asked
                st_.tbe.forward = lambda *a, **kw: pytest.fail("fbgemm's forward ran")
            try:
                got = [st_(ids, offsets)]
                with torch.no_grad():
                    got.append(st_(ids, offsets))
            finally:
                st_.tbe.forward = fbgemm
            for g in got:
                assert torch.equal(g.detach(), want)
    finally:
        torch.set_num_threads(2)
    ids, offsets = torch.tensor([1, 7]), torch.tensor([0, 1, 2])  # 7: not a row of table 0 (7 rows)
    st1 = FusedStorage([(7, 4)], [0], rectables.SparseOptimizer("sgd"))
    out, la = torch.full((2, 4), -1.0), st1._lane_args
    assert not storage_module._rowupdate.lookup(st1.tbe.weights_host.data_ptr(), ids.data_ptr(), offsets.data_ptr(),
                                                la[0].data_ptr(), la[1].data_ptr(), la[3].data_ptr(),
                                                st1._lane_rows.data_ptr(), 1, 2, 4, out.data_ptr())
    assert (out == -1).all()  # nothing written


def test_adam_refuses_per_id_weights_that_take_a_gradient():
    """Our Adam update returns no gradient for the weights: refused, not silently dropped."""
    from rectables.storage import FusedStorage

    st_ = FusedStorage([(10, 4)], [0], rectables.SparseOptimizer("adam"))
    ids, offsets = torch.tensor([1, 2, 2]), torch.tensor([0, 2, 3])
    st_(ids, offsets, torch.ones(3)).sum().backward()  # plain weights: fine
    with pytest.raises(ValueError, match="require grad.*not adam"):
        st_(ids, offsets, torch.ones(3, requires_grad=True))
    with torch.no_grad():
        st_(ids, offsets, torch.ones(3, requires_grad=True))  # no backward: fine
