"""Lane layouts against a dense pure-torch reference: forward and one optimizer step.

Covers the layouts the storage must rearrange for fbgemm (lanes reading a table that
other lanes also read, lanes stored lane by lane), summed lanes of one table merged into
one bag per id (``multihash``, stacked QR ``add``), summed lanes of two tables, and the
pooled fast path of ``mult`` (bags of at most one id), for every optimizer.
"""
import pytest
import torch

import rectables
from rectables.table import Table, check_range
from tests.helpers import random_kjt

FEATS = ["a", "b", "c"]
N = 60


class TwoTableSum(Table):
    """A sum of lanes on two different physical tables (not stacked): rows x and x // 2."""

    method = "two_table_sum"
    raw_ids = False

    def __init__(self, name, embedding_dim, feature_names, num_ids):
        super().__init__(name, embedding_dim, feature_names)
        self.num_ids, self.combine = num_ids, "sum"

    def physical_shapes(self):
        return [(self.num_ids, self.embedding_dim), (self.num_ids // 2 + 1, self.embedding_dim)]

    def feature_lanes(self, f):
        return [0, 1]

    def remap(self, values, counts):
        check_range(self, values, counts, self.num_ids)
        return self.per_feature(torch.stack([values, values // 2]), counts)


LAYOUTS = {
    # T = 2 round-robin: a table's lanes are not neighbours (storage sorts lanes)
    "unified_t2": lambda: [rectables.create_table(
        "unified", name="u", embedding_dim=8, feature_names=FEATS, buckets_per_table=17, num_tables=2,
        num_chunks=[2, 1, 3], dim_per_table=4)],
    # per-feature tables read lane by lane (lane-major group)
    "qr_mult": lambda: [rectables.create_table(
        "compositional", name=f"q_{f}", embedding_dim=8, feature_names=[f], num_ids=N, moduli=[7],
        combine="mult", threshold=10) for f in FEATS],
    "qr_add": lambda: [rectables.create_table(
        "compositional", name=f"q_{f}", embedding_dim=8, feature_names=[f], num_ids=N, moduli=[7],
        combine="add", threshold=10) for f in FEATS],
    "multihash_sum": lambda: [rectables.create_table(
        "multihash", name="m", embedding_dim=8, feature_names=FEATS, num_buckets=23, num_hashes=2,
        combine="sum")],
    # sums over two physical tables: K lanes reduced, feature by feature or lane by lane
    "two_table_sum": lambda: [TwoTableSum("s", 8, FEATS, N)],
    "two_table_sum_mixed": lambda: [TwoTableSum("s", 8, ["a", "c"], N),
                                    rectables.create_table("full", name="f", embedding_dim=8, feature_names=["b"], num_ids=N)],
    # stacked QR add (bags of both rows of every id) next to a plain table and a per-id one
    "three_groups": lambda: [
        rectables.create_table("compositional", name="q", embedding_dim=8, feature_names=["a"], num_ids=N,
                               moduli=[7], combine="add", threshold=10),
        rectables.create_table("full", name="f", embedding_dim=8, feature_names=["b"], num_ids=N),
        rectables.create_table("compositional", name="r", embedding_dim=8, feature_names=["c"], num_ids=N,
                               moduli=[7], combine="mult", threshold=10),
    ],
    # a plain table between per-id ones: outputs put back in feature order
    "mixed": lambda: [
        rectables.create_table("compositional", name="q", embedding_dim=8, feature_names=["a"], num_ids=N,
                               moduli=[7], combine="mult", threshold=10),
        rectables.create_table("full", name="f", embedding_dim=8, feature_names=["b"], num_ids=N),
        rectables.create_table("compositional", name="r", embedding_dim=8, feature_names=["c"], num_ids=N,
                               partition="crt", moduli=[7, 9], combine="mult", threshold=10),
    ],
}


def _reference_step(ebc, kjt, g, before):
    """Dense forward of the collection from copies of its physical tables, and the
    dense gradient of sum(out * g) with respect to each of them."""
    leaves = {key: w.clone().requires_grad_(True) for key, w in before.items()}
    B = kjt.stride()
    pieces = []
    for i, t in enumerate(ebc.tables):
        group, base = ebc.groups[i], ebc._base[i]
        jts = [kjt[name] for name in t.feature_names]
        remapped = t.remap(torch.cat([jt.values() for jt in jts]), [jt.values().numel() for jt in jts])
        for f, (jt, rows) in enumerate(zip(jts, remapped)):
            lanes = [leaves[(group, base + k)][r] for k, r in zip(t.feature_lanes(f), rows)]
            if t.combine == "concat":
                per_id = torch.cat(lanes, 1)
            elif t.combine == "sum":
                per_id = torch.stack(lanes).sum(0)
            else:
                per_id = torch.stack(lanes).prod(0)
            bag = torch.repeat_interleave(torch.arange(B), jt.lengths())
            pieces.append(torch.zeros(B, per_id.shape[1]).index_add(0, bag, per_id))
    out = torch.cat(pieces, 1)
    (out * g).sum().backward()
    return out.detach(), {key: leaf.grad for key, leaf in leaves.items()}


def _apply(opt, w, grad):
    """One step of ``opt`` on the rows of w [M, D] that got a gradient."""
    touched = (grad != 0).any(1, keepdim=True)
    if opt.name == "adagrad":
        step = opt.lr * grad / ((grad * grad).sqrt() + opt.eps)
    elif opt.name == "rowwise_adagrad":
        step = opt.lr * grad / ((grad * grad).mean(1, keepdim=True).sqrt() + opt.eps)
    elif opt.name == "adam":
        v = (grad * grad).mean(1, keepdim=True)
        step = opt.lr * grad / (v.sqrt() + opt.eps)  # bias-corrected first step
    else:
        step = opt.lr * grad
    return torch.where(touched, w - step, w)


@pytest.mark.parametrize("max_len", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_dense_reference(layout, optimizer, max_len):
    torch.manual_seed(0)
    ebc = rectables.EmbeddingBagCollection(LAYOUTS[layout](), rectables.SparseOptimizer(optimizer, lr=0.05))
    kjt = random_kjt(FEATS, batch=9, max_len=max_len, num_ids=N)
    before = {(g, k): st.weight(k).clone() for g, st in ebc.storages.items() for k in range(len(st.shapes))}
    out = ebc(kjt).values()
    g = torch.randn_like(out)
    want_out, grads = _reference_step(ebc, kjt, g, before)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    (out * g).sum().backward()
    for (group, k), w in before.items():
        st = ebc.storages[group]
        torch.testing.assert_close(st.weight(k), _apply(st.optimizer, w, grads[(group, k)]), rtol=1e-4, atol=1e-6)


def test_lane_product_gradients():
    from rectables.lanes import _LaneProduct

    for K in (2, 3):
        lanes = torch.randn(4, K, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_LaneProduct.apply, (lanes,))
        torch.testing.assert_close(_LaneProduct.apply(lanes), lanes.prod(1))


@pytest.mark.parametrize("layout", ["qr_add", "multihash_sum"])
def test_summed_lanes_of_one_table_are_one_lane(layout):
    ebc = rectables.EmbeddingBagCollection(LAYOUTS[layout]())
    assert [len(st.lane_tables) for st in ebc.storages.values()] == [len(FEATS)]  # not K per feature
    seq = rectables.EmbeddingCollection(LAYOUTS[layout]())  # one row per id: K lanes, summed after
    assert [len(st.lane_tables) for st in seq.storages.values()] == [2 * len(FEATS)]


@pytest.mark.parametrize("lane_ids", [[3, 3], [4, 4, 4], [5], [0, 0], [2, 3], [3, 0, 1], [0]])
def test_one_id_per_bag_gives_each_id_a_bag_and_pads_short_lanes_with_empty_bags(lane_ids):
    """Lane j's ids get bags j B' .. j B' + n_j - 1 of one id each, B' = max n_j, then empty
    bags; equal lanes (the fast path) and unequal ones alike."""
    from rectables.lanes import one_id_per_bag

    offsets, width = one_id_per_bag(lane_ids).tolist(), max(max(lane_ids), 1)
    assert len(offsets) == len(lane_ids) * width + 1 and offsets[0] == 0 and offsets[-1] == sum(lane_ids)
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    assert sizes == [int(i < n) for n in lane_ids for i in range(width)]
