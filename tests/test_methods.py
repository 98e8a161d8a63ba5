"""Method-specific checks for unified and compositional (the contract is in test_conformance)."""
import math

import pytest
import torch

import rectables
from rectables import hashing
from rectables.methods.compositional import partition, partition_sizes
from rectables.methods.unified import unified_for_bytes
from rectables.registry import table_class
from tests.helpers import random_kjt


@pytest.mark.parametrize("kind, moduli, n", [
    ("qr", [7], 1000), ("qr", [1], 50), ("qr", [1000], 1000), ("mixed_radix", [4, 5, 60], 1000),
    ("crt", [7, 11, 13], 1001), ("crt", [8, 9, 25], 1800),
])
def test_partitions_are_complementary_exhaustive(kind, moduli, n):
    sizes = partition_sizes(kind, moduli, n)
    digits = partition(torch.arange(n), kind, moduli)
    assert all(int(d.max()) < s and int(d.min()) >= 0 for d, s in zip(digits, sizes))
    assert len({tuple(col) for col in digits.T.tolist()}) == n


@pytest.mark.parametrize("kind, moduli", [("qr", [2**20]), ("mixed_radix", [2**13, 2**13, 2**14]),
                                          ("crt", [2**20, 2**20 + 1])])
def test_partitions_unique_sampled_at_2_pow_40(kind, moduli):
    n = 2**40
    partition_sizes(kind, moduli, n)
    ids = torch.unique(torch.randint(0, n, (200_000,), generator=torch.Generator().manual_seed(0)))
    ids = torch.cat([ids, torch.tensor([n - 1, n - 2, 2**24, 2**24 + 1])]).unique()
    digits = partition(ids, kind, moduli)
    assert len({tuple(col) for col in digits.T.tolist()}) == len(ids)


def test_qr_is_integer_exact_beyond_float32():
    x = torch.tensor([2**24, 2**24 + 1, 2**53 + 1])
    r, q = partition(x, "qr", [3])  # (x mod m, x div m)
    assert (q * 3 + r).tolist() == x.tolist()


@pytest.mark.parametrize("kind, moduli, n, msg", [
    ("mixed_radix", [4, 5], 21, "collide"), ("crt", [6, 9], 50, "coprime"), ("qr", [2, 3], 10, "one modulus"),
    ("qr", [2], 0, "num_ids must be > 0")])
def test_partition_checks_at_construction(kind, moduli, n, msg):
    with pytest.raises(ValueError, match=msg):
        rectables.create_table("compositional", name="t", embedding_dim=8, feature_names=["a"], num_ids=n,
                               partition=kind, moduli=moduli, threshold=0)


@pytest.mark.parametrize("combine", ["add", "mult", "concat"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_compositional_matches_per_id_reference_with_bags(combine, pooling):
    torch.manual_seed(0)
    t = rectables.create_table("compositional", name="t", embedding_dim=8, feature_names=["a"], num_ids=1000,
                               partition="qr", moduli=[30], combine=combine, threshold=0, pooling=pooling)
    ebc = rectables.EmbeddingBagCollection([t], rectables.SparseOptimizer("sgd"))
    kjt = random_kjt(["a"], 6, 4, num_ids=1000)
    st, base = ebc.table_storage(0)
    if combine == "add":  # stacked: one physical table, the remainder rows first
        assert t.physical_shapes() == [(30 + 34, 8)]
        w0, w1 = st.weight(base).split(t.sizes)
    else:
        w0, w1 = st.weight(base), st.weight(base + 1)
    digits = partition(kjt.values(), "qr", [30])
    a, b = w0[digits[0]], w1[digits[1]]
    per_id = {"add": a + b, "mult": a * b, "concat": torch.cat([a, b], 1)}[combine]
    bag = torch.repeat_interleave(torch.arange(6), kjt.lengths())
    want = torch.zeros(6, 8).index_add_(0, bag, per_id)
    if pooling == "mean":
        want = want / kjt.lengths().clamp(min=1).unsqueeze(1)
    torch.testing.assert_close(ebc(kjt).values(), want)  # a sum of products, not a product of sums


def test_compositional_mult_init_is_symmetric_and_small_tables_stay_plain():
    t = rectables.create_table("compositional", name="t", embedding_dim=16, feature_names=["a"], num_ids=10_000, moduli=[100])
    small = rectables.create_table("compositional", name="s", embedding_dim=16, feature_names=["b"], num_ids=150)
    ebc = rectables.EmbeddingBagCollection([t, small])
    st, base = ebc.table_storage(0)
    w = torch.cat([st.weight(base).flatten(), st.weight(base + 1).flatten()])
    assert (w < 0).float().mean() > 0.4 and (w > 0).float().mean() > 0.4
    assert small.physical_shapes() == [(150, 16)] and ebc.groups == ["rows", "bags"]


def test_compositional_hashes_raw_ids_into_range():
    t = rectables.create_table("compositional", name="t", embedding_dim=8, feature_names=["a"], num_ids=1000,
                               moduli=[32], hash_ids=True, threshold=0)
    raw = torch.tensor([2**63 - 1, -(2**63), 123456789012345])
    (rows,) = t.remap(raw, [3])
    want = hashing.bucket(raw, t.keys[0], 1000)
    assert torch.equal(rows, partition(want, "qr", [32]))


def test_unified_round_robin_lanes_and_dims():
    t = rectables.create_table("unified", name="u", embedding_dim=8, feature_names=["a", "b", "c"],
                               buckets_per_table=64, num_tables=3, num_chunks=[2, 1, 3], dim_per_table=4)
    assert [t.feature_lanes(f) for f in range(3)] == [[0, 1], [2], [0, 1, 2]]
    assert t.feature_dims() == [8, 4, 12]
    ebc = rectables.EmbeddingBagCollection([t], rectables.SparseOptimizer("sgd"))
    kjt = random_kjt(["a", "b", "c"], 4, 2, num_ids=10**9)
    out = ebc(kjt)
    assert out.length_per_key() == [8, 4, 12]
    # chunk j of feature f = row bucket(x, salt(f, j)) of table lane(f, j), concatenated in chunk order
    feat = kjt["c"]
    bag = torch.repeat_interleave(torch.arange(4), feat.lengths())
    chunks = [ebc.storage.weight(lane)[hashing.bucket(feat.values(), hashing.salt_key(0, 2, j), 64)]
              for j, lane in enumerate([0, 1, 2])]
    want = torch.zeros(4, 12).index_add_(0, bag, torch.cat(chunks, 1))
    torch.testing.assert_close(out.values()[:, 12:], want)


def test_unified_budget_helpers():
    t = unified_for_bytes(10_000_000, 16, ["a", "b"], num_tables=2, num_chunks=2)
    weights = sum(m * d * 4 for m, d in t.physical_shapes())
    assert 9_900_000 < weights <= 10_000_000
    (u,) = rectables.registry.table_class("unified").for_budget_all(16, ["a", "b"], [1000, 3000], 0.25)
    assert math.isclose(sum(m * d for m, d in u.physical_shapes()), 0.25 * 4000 * 16, rel_tol=0.01)


@pytest.mark.parametrize("kind,moduli", [("qr", [7]), ("mixed_radix", [3, 5, 7]), ("crt", [4, 5, 7])])
def test_partition_id_major_is_the_same_digits_stored_id_by_id(kind, moduli):
    x = torch.arange(140)
    a, b = partition(x, kind, moduli), partition(x, kind, moduli, id_major=True)
    assert torch.equal(a, b) and b.t().is_contiguous() and a.is_contiguous()


@pytest.mark.parametrize("method", rectables.list_tables())
def test_sizing_from_configs_is_a_budget_or_the_documented_default(method):
    """``from_configs`` sizes every method alike: ``budget`` = a fraction of full's bytes;
    nothing = num_embeddings fills the method's size argument (the docstring's default)."""
    from torchrec import EmbeddingBagConfig

    from rectables.registry import table_class

    cfg = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=4000, feature_names=["a"])]
    plain = rectables.EmbeddingBagCollection.from_configs(cfg, methods={"t": method}).tables[0]
    size_arg = table_class(method).size_arg
    assert getattr(plain, size_arg) == 4000 and size_arg in rectables.compat.tables_from_configs.__doc__
    if method == "full":
        return
    if table_class(method).no_budget:  # a method that sizes itself refuses a budget by name
        with pytest.raises(ValueError, match=f"'{method}'.*takes no budget"):
            rectables.EmbeddingBagCollection.from_configs(cfg, methods={"t": (method, {"budget": 1 / 4})})
        return
    sized = rectables.EmbeddingBagCollection.from_configs(cfg, methods={"t": (method, {"budget": 1 / 4})})
    rep = rectables.memory_report(sized)["tables"]["t"]
    assert 0.2 * 4 * 16 * 4000 < rep["weights"] + (rep["buffers"] if method == "dynamic" else 0) <= 0.27 * 4 * 16 * 4000
    with pytest.raises(ValueError, match="budget or the method's own options"):
        rectables.EmbeddingBagCollection.from_configs(cfg, methods={"t": (method, {"budget": 0.25, size_arg: 10})})


@pytest.mark.parametrize("method", [m for m in rectables.list_tables() if not table_class(m).no_budget
                                    and m != "compact"])  # compact: whole dims, tested below
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_a_budget_means_the_same_reported_bytes_for_every_method(method, optimizer):
    """Sized on what memory_report reports (weights + optimizer state + buffers), every
    method lands at 1/4 of full's bytes (unified sized on weights held 1/3.8)."""
    from rectables.registry import table_class
    from rectables.sizing import tables_for_budget

    feats, cards = [f"f{i}" for i in range(6)], [50_000, 20_000, 9_000, 3_000, 800, 300]
    opt = rectables.SparseOptimizer(optimizer)

    def total(tables):
        return rectables.memory_report(rectables.EmbeddingBagCollection(tables, opt, device="meta"))["tables"]

    full = sum(t["total"] for t in total(table_class("full").for_budget_all(16, feats, cards, 1.0)).values())
    got = sum(t["total"] for t in total(tables_for_budget(table_class(method), 16, feats, cards, 0.25, opt)).values())
    low = 0.19 if method == "compositional" else 0.24  # QR's m = ceil(1/fraction) moves in steps: 1/4 -> 1/5
    assert low * full <= got <= 0.25 * full, got / full


def test_an_unreachable_budget_gives_the_smallest_tables_not_the_smallest_fraction():
    """Small features: QR cannot reach 1/16 (m + n/m rows >= 2 sqrt(n)), and its m =
    ceil(1/fraction) grows as the fraction shrinks; the search once returned m = 1024 on
    300 ids, a table larger than full's."""
    from rectables.registry import table_class
    from rectables.sizing import table_bytes, tables_for_budget

    opt = rectables.SparseOptimizer("rowwise_adagrad")
    feats, cards = ["a", "b"], [300, 400]
    full = table_bytes(table_class("full").for_budget_all(16, feats, cards, 1.0), opt)
    tables = tables_for_budget(table_class("compositional"), 16, feats, cards, 1 / 16, opt)
    assert table_bytes(tables, opt) < full / 4 and tables[0].moduli[0] < 300
