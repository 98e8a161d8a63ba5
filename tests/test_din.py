"""DIN and its base model (models/din.py), the sequence protocol (data/sequences.py)
and GAUC."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from data.sequences import SequenceBatches, Sequences, make_splits
from models.din import DIN, _side_by_side, segment_softmax
from rectables.metrics import grouped_auc
from rectables.registry import table_class
from rectables.sizing import tables_for_budget

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"


def din(method="full", budget=1.0, items=30, cats=4, dim=4, **kw):
    opt = rectables.SparseOptimizer("rowwise_adagrad", lr=0.1)
    tables = tables_for_budget(table_class(method), dim, ["item", "cat"], [items, cats], budget, opt)
    return DIN(rectables.EmbeddingCollection(tables, opt), (8, 4), (8,), **kw)


def kjt(targets, histories, cats=4):
    items = list(targets) + [i for h in histories for i in h]
    lengths = [1] * len(targets) + [len(h) for h in histories]
    values = torch.tensor(items + [i % cats for i in items])
    return KeyedJaggedTensor.from_lengths_sync(["item", "cat"], values, torch.tensor(lengths * 2))


@pytest.mark.parametrize("softmax", [False, True])
def test_attention_equals_a_padded_and_masked_reference(softmax):
    torch.manual_seed(0)
    m = din(softmax=softmax, activation="prelu")
    m.eval()
    targets, hist = [1, 2, 3], [[4, 5, 6], [7], []]
    got = m(torch.zeros(3, 0), kjt(targets, hist))
    out = m.embedding(kjt(targets, hist))
    e = torch.cat([out["item"].values(), out["cat"].values()], 1)
    q, keys = e[:3], e[3:]
    L, pad = 3, torch.zeros(3, 3, e.shape[1])
    mask = torch.zeros(3, L, dtype=torch.bool)
    at = 0
    for b, h in enumerate(hist):
        pad[b, : len(h)] = keys[at : at + len(h)]
        mask[b, : len(h)] = True
        at += len(h)
    qq = q[:, None].expand_as(pad)
    w = m.attention(torch.cat([qq, pad, qq - pad, qq * pad], 2).reshape(-1, 4 * e.shape[1])).view(3, L)
    if softmax:
        w = torch.where(mask, w, -torch.inf).softmax(1).nan_to_num(0.0)
    w = torch.where(mask, w, 0.0)  # padded positions: no weight
    ref = m.mlp(torch.cat([q, (w[..., None] * pad).sum(1)], 1)).squeeze(1)
    assert torch.allclose(got, ref, atol=1e-5) and torch.isfinite(got).all()


def test_a_sample_depends_only_on_its_own_history_and_gets_no_gradient_from_others():
    torch.manual_seed(0)
    m = din()
    m.eval()
    a = m(torch.zeros(2, 0), kjt([1, 2], [[4, 5], [6, 7, 8]]))
    b = m(torch.zeros(2, 0), kjt([1, 2], [[4, 5], [9, 10, 11, 12, 13]]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    opt = rectables.SparseOptimizer("sgd", lr=1.0)
    tables = tables_for_budget(table_class("full"), 4, ["item", "cat"], [30, 4], 1.0, opt)
    m = DIN(rectables.EmbeddingCollection(tables, opt), (8, 4), (8,), activation="prelu")
    before = m.embedding.state_dict()["embeddings.t_item.weight"].clone()
    m(torch.zeros(2, 0), kjt([1, 2], [[4, 5], [20, 21]]))[0].backward()  # sample 0's logit only
    moved = (m.embedding.state_dict()["embeddings.t_item.weight"] != before).any(1).nonzero().flatten().tolist()
    assert moved == [1, 4, 5]  # its target and history; not 2, 20, 21


def test_categories_must_line_up_with_the_items():
    m = din()
    values, lengths = torch.tensor([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([1, 1, 3, 2, 1, 1, 3, 2])
    assert m(torch.zeros(2, 0), KeyedJaggedTensor.from_lengths_sync(["item", "cat"], values, lengths)).shape == (2,)
    shifted = torch.tensor([1, 1, 3, 2, 1, 1, 2, 3])  # the same total, the categories in other histories
    with pytest.raises(ValueError, match="'cat' has other bag lengths"):
        m(torch.zeros(2, 0), KeyedJaggedTensor.from_lengths_sync(["item", "cat"], values, shifted))


def test_feature_rows_side_by_side_are_read_in_place_and_others_copied():
    x = torch.randn(5, 8, requires_grad=True)
    y = x * 2  # a lookup's output; the collection hands out column blocks of it
    a, b, c = y.split([3, 2, 3], 1)
    for parts, in_place in (([a, b], True), ([b, c], True), ([a, b, c], True), ([b, a], False), ([a, c], False),
                            ([a[:4], b[:4]], False), ([a, torch.randn(5, 2)], False)):
        got = _side_by_side(parts)
        assert torch.equal(got, torch.cat(parts, 1))
        assert (got.data_ptr() == parts[0].data_ptr() and (got is y or got._base is y)) == in_place, parts
    assert _side_by_side([a, b, c]) is y  # all its columns: the lookup itself (a full narrow's backward copies)
    _side_by_side([b, c]).pow(2).sum().backward()  # the gradient reaches the lookup as through cat
    want = torch.zeros(5, 8)
    want[:, 3:] = 8 * x.detach()[:, 3:]
    torch.testing.assert_close(x.grad, want)


def test_segment_softmax_sums_to_one_per_history():
    w, seg = torch.randn(7), torch.tensor([0, 0, 0, 2, 2, 3, 3])
    s = segment_softmax(w, seg, 4)
    assert torch.allclose(torch.zeros(4).index_add(0, seg, s), torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_din_trains_through_the_attention_op_as_through_the_separate_ops():
    """A training step of DIN (its attention MLP as one op) gives every parameter the
    gradient, and the running statistics the values, of the torch ops."""
    from models import din_ops as din_module

    g = torch.Generator().manual_seed(4)
    hist = [torch.randint(0, 30, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (40,), generator=g)]
    x = kjt(torch.randint(0, 30, (40,), generator=g).tolist(), hist)
    outs = []
    keep = din_module._native
    for native in (True, False):
        din_module._native = keep if native else None
        try:
            torch.manual_seed(0)
            m = din(dim=8)
            m.attention[1].alpha.data.uniform_(-0.5, 0.5)
            m(torch.zeros(40, 0), x).square().sum().backward()
            outs.append([p.grad for p in m.attention.parameters()] + list(m.attention.buffers()))
        finally:
            din_module._native = keep
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, budget", [("full", 1.0), ("hash", 0.5), ("unified", 0.5), ("compositional", 0.5),
                                            ("dynamic", 1.0)])
@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_every_method_overfits_a_small_batch(method, budget, pooling):
    torch.manual_seed(0)
    m = din(method, budget, dim=8, pooling=pooling)
    dense = torch.optim.Adam(rectables.dense_parameters(m), lr=0.01)
    g = torch.Generator().manual_seed(0)
    hist = [torch.randint(0, 30, (int(n),), generator=g).tolist() for n in torch.randint(0, 6, (32,), generator=g)]
    x, y = kjt(torch.randint(0, 30, (32,), generator=g).tolist(), hist), (torch.rand(32, generator=g) < 0.5).float()
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(torch.zeros(32, 0), x), y)
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_gauc_by_hand():
    g = np.array([7, 7, 7, 3, 3, 5, 5, 9])
    s = np.array([0.9, 0.1, 0.5, 0.3, 0.3, 0.2, 0.8, 0.4])
    y = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    # user 7: AUC 1 (3 rows); user 3: a tie, 1/2 (2 rows); users 5, 9: one class, skipped
    assert grouped_auc(g, s, y) == pytest.approx((3 * 1 + 2 * 0.5) / 5)
    assert np.isnan(grouped_auc(np.array([1, 1]), np.array([0.1, 0.2]), np.array([1, 1])))


def test_sequence_protocol():
    seq = Sequences(np.array([0, 5, 8]), np.array([0, 1, 2, 3, 4, 5, 6, 7]), num_items=20)
    sp = make_splits(seq, seed=0, max_history=2)
    for name, t_pos in (("test", [4, 7]), ("val", [3, 6])):
        s = sp[name]
        pos = s.label == 1
        assert s.target[pos].tolist() == [seq.items[t] for t in t_pos] and (s.hi[pos] == np.array(t_pos)).all()
    tr = sp["train"]
    assert sorted(tr.target[tr.label == 1].tolist()) == [1, 2]  # 1 <= t <= n - 3 (0-based): user 1 has none
    assert ((tr.hi - tr.lo) <= 2).all() and ((tr.hi - tr.lo) >= 1).all()
    for s in sp.values():  # each positive has a negative with the same history; never an item of the user
        neg = s.label == 0
        assert neg.sum() == (s.label == 1).sum() and (s.lo[neg] == s.lo[~neg]).all()
        for u, t in zip(s.user[neg], s.target[neg]):
            assert t not in seq.items[seq.offsets[u] : seq.offsets[u + 1]]
    again = make_splits(seq, seed=0, max_history=2)
    assert all(np.array_equal(sp[k].target, again[k].target) for k in sp)
    b = next(iter(SequenceBatches(seq, sp["test"], 8)))
    assert b.sparse.stride() == 2 * len(b.labels) and b.groups.tolist() == sp["test"].user.tolist()


@pytest.mark.skipif(not (MOVIELENS / "u.data").exists(), reason="../shared/data not present")
def test_movielens_din_run_reports_auc_and_gauc(tmp_path):
    from rectables.sequential import run_din

    s = run_din({"data": str(MOVIELENS), "model": "din", "dim": 8,
                 "train": {"epochs": 1, "max_steps_per_epoch": 40, "progress": False}}, tmp_path / "r")
    assert s["test"]["n"] == 2 * 943 and 0.6 < s["test"]["auc"] and 0.6 < s["test"]["gauc"] <= 1


def _tiny_movielens(d: Path, users=40, items=25, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir()
    rows = [f"{u}\t{i}\t{rng.integers(1, 6)}\t{1000 + k}" for u in range(1, users + 1)
            for k, i in enumerate(rng.choice(np.arange(1, items + 1), 8, replace=False))]
    (d / "u.data").write_text("\n".join(rows) + "\n")
    genre = lambda i: "|".join("1" if g == i % 19 else "0" for g in range(19))  # noqa: E731
    (d / "u.item").write_text("".join(f"{i}|t|d||u|{genre(i)}\n" for i in range(1, items + 1)), encoding="latin-1")


def test_compare_runs_din_with_gauc_and_no_ctr_baselines(tmp_path):
    import json

    from rectables.compare import compare

    _tiny_movielens(tmp_path / "ml")
    spec = {"data": str(tmp_path / "ml"), "model": "din", "dim": 4,
            "train": {"epochs": 1, "batch_size": 32, "progress": False}}
    rows = compare(spec, ["full", "hash"], [0.5], tmp_path / "cmp", seeds=[0, 1])
    assert [r["method"] for r in rows] == ["full", "hash"] and all(0 <= r["gauc"] <= 1 for r in rows)
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| GAUC |" in text and "base rate" not in text
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"][0]["seeds"] == [0, 1]

