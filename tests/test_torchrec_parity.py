"""rectables against torchrec's own modules with only the constructor swapped: random
configs (several tables, shared tables and features, weighted or not, sum and mean, any
dim, empty bags, B = 1), the same initial weights from the same seed, forward and one
SGD step; config fields that change the tables (init_fn, init ranges, FP16)."""
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection as TorchrecEBC
from torchrec.modules.embedding_modules import EmbeddingCollection as TorchrecEC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables

LR = 0.3


@st.composite
def setups(draw):
    n_tables = draw(st.integers(1, 3))
    features = ["f0", "f1", "f2", "f3"]
    weighted = draw(st.booleans())
    configs = []
    for t in range(n_tables):
        feats = draw(st.lists(st.sampled_from(features), min_size=1, max_size=3, unique=True))
        mean = not weighted and draw(st.booleans())  # torchrec's own EBC refuses weighted mean
        configs.append(EmbeddingBagConfig(name=f"t{t}", embedding_dim=draw(st.integers(1, 33)),
                                          num_embeddings=draw(st.integers(1, 40)), feature_names=feats,
                                          pooling=PoolingType.MEAN if mean else PoolingType.SUM))
    return configs, weighted, draw(st.integers(1, 4)), draw(st.integers(0, 1000))


def kjt_for(configs, weighted, B, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = sorted({f for c in configs for f in c.feature_names}, reverse=seed % 2 == 0)
    limit = {f: min(c.num_embeddings for c in configs if f in c.feature_names) for f in keys}
    lengths = torch.randint(0, 4, (len(keys) * B,), generator=gen)
    values = torch.cat([torch.randint(0, limit[f], (int(n),), generator=gen)
                        for i, f in enumerate(keys) for n in [lengths[i * B : (i + 1) * B].sum()]])
    w = torch.rand(len(values), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=w)


@settings(max_examples=40, deadline=None)
@given(setup=setups())
def test_parity_with_torchrec_ebc_forward_and_sgd_step(setup):
    configs, weighted, B, seed = setup
    torch.manual_seed(seed)
    theirs = TorchrecEBC(tables=configs, is_weighted=weighted)
    torch.manual_seed(seed)
    ours = rectables.EmbeddingBagCollection(tables=configs, is_weighted=weighted,
                                            optimizer=rectables.SparseOptimizer("sgd", lr=LR))
    for k, c in enumerate(configs):  # the same initial rows from the same seed
        assert torch.equal(ours.storage.weight(k), theirs.embedding_bags[c.name].weight.detach())
    kjt = kjt_for(configs, weighted, B, seed)
    a, b = theirs(kjt), ours(kjt)
    assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
    torch.testing.assert_close(b.values(), a.values(), rtol=1e-5, atol=1e-6)
    target = torch.randn(a.values().shape, generator=torch.Generator().manual_seed(seed))
    (a.values() * target).sum().backward()
    (b.values() * target).sum().backward()
    with torch.no_grad():
        for p in theirs.parameters():
            p -= LR * p.grad
    for k, c in enumerate(configs):
        torch.testing.assert_close(ours.storage.weight(k), theirs.embedding_bags[c.name].weight.detach(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 3, 5, 8, 33])
def test_sequence_collection_matches_torchrec_at_any_dim(dim):
    configs = [EmbeddingConfig(name="t1", embedding_dim=dim, num_embeddings=10, feature_names=["f1", "f2"]),
               EmbeddingConfig(name="t2", embedding_dim=dim, num_embeddings=7, feature_names=["f2"])]
    torch.manual_seed(0)
    theirs = TorchrecEC(tables=configs)
    torch.manual_seed(0)
    ours = rectables.EmbeddingCollection(tables=configs)
    kjt = kjt_for(configs, False, 3, 1)
    a, b = theirs(kjt), ours(kjt)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key].values(), a[key].values())
        assert torch.equal(b[key].lengths(), a[key].lengths())


def test_init_fn_and_init_ranges_are_honoured():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=50, feature_names=["f1"],
                                  init_fn=partial(torch.nn.init.normal_, mean=0.0, std=1.5)),
               EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=50, feature_names=["f2"],
                                  weight_init_min=2.0, weight_init_max=3.0)]
    torch.manual_seed(7)
    theirs = TorchrecEBC(tables=configs)
    torch.manual_seed(7)
    ours = rectables.EmbeddingBagCollection(tables=configs)
    for k, c in enumerate(configs):
        assert torch.equal(ours.storage.weight(k), theirs.embedding_bags[c.name].weight.detach())
    assert ours.storage.weight(0).std() > 1.0 and ours.storage.weight(1).min() >= 2.0


def test_fp16_tables_store_half_the_bytes():
    def make(data_type):
        configs = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"],
                                      data_type=data_type)]
        return rectables.EmbeddingBagCollection(tables=configs, optimizer=rectables.SparseOptimizer("sgd", lr=0.1))
    half, full = make(DataType.FP16), make(DataType.FP32)
    assert half.storage.weight(0).dtype == torch.float16
    rep_h, rep_f = rectables.memory_report(half), rectables.memory_report(full)
    assert rep_h["tables"]["t1"]["weights"] * 2 == rep_f["tables"]["t1"]["weights"] == 100 * 8 * 4
    full.storage.weight(0).copy_(half.storage.weight(0).float())
    kjt = kjt_for([EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"])], False, 4, 0)
    torch.testing.assert_close(half(kjt).values(), full(kjt).values(), rtol=1e-3, atol=1e-3)
    before = half.storage.weight(0).clone()
    half(kjt).values().sum().backward()
    assert not torch.equal(before, half.storage.weight(0))  # the fused update runs on fp16 rows


def test_padded_dims_are_counted_and_stay_zero():
    ebc = rectables.EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=5, num_embeddings=10, feature_names=["f"])],
        optimizer=rectables.SparseOptimizer("adagrad", lr=0.5))
    assert rectables.memory_report(ebc)["tables"]["t"]["weights"] == 10 * 8 * 4  # rows stored 8 wide
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]))
    out = ebc(kjt).values()
    assert out.shape == (2, 5)
    out.square().sum().backward()
    assert ebc.storage._stored(0)[:, 5:].abs().sum() == 0


def test_default_device_from_context():
    config = EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"])
    with torch.device("meta"):
        ebc = rectables.EmbeddingBagCollection(tables=[config])
    assert ebc.device == torch.device("meta")
    assert rectables.EmbeddingBagCollection(tables=[config]).device == torch.device("cpu")


def test_state_dict_has_torchrec_keys_and_loads_strictly_both_ways():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=5, num_embeddings=30, feature_names=["a", "b"]),
               EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=20, feature_names=["c"])]
    theirs = TorchrecEBC(tables=configs)
    for p in theirs.parameters():  # "trained": not what a seed gives
        torch.nn.init.normal_(p)
    ours = rectables.EmbeddingBagCollection(tables=configs)  # default optimizer: row-wise Adagrad, with state
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["embedding_bags.t1.weight", "embedding_bags.t2.weight"]
    ours.load_state_dict(theirs.state_dict())  # strict
    kjt = kjt_for(configs, False, 3, 5)
    torch.testing.assert_close(ours(kjt).values(), theirs(kjt).values())
    back = TorchrecEBC(tables=configs)
    back.load_state_dict(ours.state_dict())  # strict, the other way
    torch.testing.assert_close(back(kjt).values(), theirs(kjt).values())


def test_parameters_are_the_rows_and_a_torch_optimizer_leaves_them_to_the_fused_one():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a"])]
    ours = rectables.EmbeddingBagCollection(tables=configs, optimizer=rectables.SparseOptimizer("rowwise_adagrad", lr=0.1))
    assert [n for n, _ in ours.named_parameters()] == ["embedding_bags.t1.weight"]  # no optimizer state
    sgd = torch.optim.SGD(ours.parameters(), lr=100.0)
    kjt = kjt_for(configs, False, 4, 1)
    before = ours.embedding_bags["t1"].weight.detach().clone()
    ours(kjt).values().sum().backward()
    fused = ours.embedding_bags["t1"].weight.detach().clone()
    assert not torch.equal(before, fused)  # the fused row-wise Adagrad updated the rows in backward
    assert ours.embedding_bags["t1"].weight.grad is None
    sgd.step()  # sees no gradient: changes nothing
    assert torch.equal(ours.embedding_bags["t1"].weight.detach(), fused)


@pytest.mark.parametrize("pooled", [True, False])
def test_from_torchrec_copies_full_tables_and_compresses_others(pooled):
    Config, cls = (EmbeddingBagConfig, TorchrecEBC) if pooled else (EmbeddingConfig, TorchrecEC)
    configs = [Config(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a"]),
               Config(name="t2", embedding_dim=8, num_embeddings=1000, feature_names=["b"])]
    theirs = cls(tables=configs)
    ours = rectables.from_torchrec(theirs, methods={"t2": ("hash", {"num_buckets": 50})})
    assert type(ours).__name__ == type(theirs).__name__ and [t.method for t in ours.tables] == ["full", "hash"]
    rows = ours.embedding_bags if pooled else ours.embeddings
    theirs_rows = theirs.embedding_bags if pooled else theirs.embeddings
    assert torch.equal(rows["t1"].weight, theirs_rows["t1"].weight) and rows["t2"].weight.shape == (50, 8)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([3, 4, 999]),
                                              lengths=torch.tensor([1, 1, 1, 0]))
    a, b = theirs(kjt), ours(kjt)
    if pooled:
        torch.testing.assert_close(b.values()[:, :8], a.values()[:, :8])
    else:
        torch.testing.assert_close(b["a"].values(), a["a"].values())


def test_introspection_matches_torchrec():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a", "b"])]
    ours, theirs = rectables.EmbeddingBagCollection(tables=configs, is_weighted=True), TorchrecEBC(tables=configs, is_weighted=True)
    assert ours.embedding_bag_configs() == theirs.embedding_bag_configs() and ours.is_weighted() == theirs.is_weighted()
    native = rectables.EmbeddingBagCollection([rectables.create_table("hash", name="h", embedding_dim=4,
                                                                      feature_names=["x"], num_buckets=7)])
    (c,) = native.embedding_bag_configs()
    assert (c.name, c.embedding_dim, c.feature_names, c.num_embeddings) == ("h", 4, ["x"], 7)
    ec_configs = [EmbeddingConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a"])]
    ec, tec = rectables.EmbeddingCollection(tables=ec_configs), TorchrecEC(tables=ec_configs)
    assert ec.embedding_configs() == tec.embedding_configs() and ec.embedding_dim() == tec.embedding_dim()
    assert ec.need_indices() == tec.need_indices() and ec.embedding_names_by_table() == tec.embedding_names_by_table()
