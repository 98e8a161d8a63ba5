"""Bad input names the feature; torchrec configs and modules swap in one line."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection as TorchrecEBC
from torchrec.modules.embedding_modules import EmbeddingCollection as TorchrecEC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from tests.helpers import collection, random_kjt


def _kjt(keys, values, lengths):
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths))


@pytest.mark.parametrize("bad", [-1, 300, 10**12])
def test_out_of_range_id_names_feature(bad):
    ebc = collection("full", ["a", "b"])
    with pytest.raises(ValueError, match=r"feature 'b'.*" + str(bad)):
        ebc(_kjt(["a", "b"], [1, 2, bad], [1, 1, 1, 0]))


def test_missing_key_named_and_order_free():
    ebc = collection("hash", ["a", "b"])
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['b'\]"):
        ebc(_kjt(["a", "c"], [1, 2], [1, 1, 0, 0]))
    x = _kjt(["a", "b"], [1, 2, 3], [1, 1, 1, 0])
    y = _kjt(["b", "a"], [3, 1, 2], [1, 0, 1, 1])
    assert torch.equal(ebc(x).values(), ebc(y).values())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_buckets"):
        rectables.create_table("hash", name="t", embedding_dim=4, feature_names=["a"], num_buckets=0)
    with pytest.raises(ValueError, match="unknown table method"):
        rectables.create_table("nope", name="t")
    with pytest.raises(ValueError, match="not divisible"):
        rectables.create_table("multihash", name="t", embedding_dim=6, feature_names=["a"], num_buckets=4, num_hashes=4, combine="concat")
    with pytest.raises(ValueError, match="optimizer"):
        rectables.SparseOptimizer("adamw")


def _copy_from_torchrec(ours, theirs):
    for k, t in enumerate(ours.tables):
        src = theirs.embedding_bags[t.name] if hasattr(theirs, "embedding_bags") else theirs.embeddings[t.name]
        ours.storage.weight(k).copy_(src.weight.detach())


def test_swap_torchrec_ebc_for_rectables():
    configs = [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=20, feature_names=["c"], pooling=PoolingType.MEAN),
    ]
    kjt = random_kjt(["c", "a", "b"], 5, 3, num_ids=20)
    theirs = TorchrecEBC(tables=configs)
    ours = rectables.EmbeddingBagCollection.from_configs(configs)
    _copy_from_torchrec(ours, theirs)
    a, b = theirs(kjt), ours(kjt)
    assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
    torch.testing.assert_close(a.values(), b.values())


def test_from_configs_methods_and_sizes():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=1000, feature_names=["a"])]
    ebc = rectables.EmbeddingBagCollection.from_configs(configs, methods={"t1": ("multihash", {"num_hashes": 2})})
    assert ebc.tables[0].method == "multihash" and ebc.storage.shapes == [(1000, 8)]


def test_swap_torchrec_ec_for_rectables():
    configs = [EmbeddingConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a", "b"])]
    kjt = random_kjt(["a", "b"], 4, 3, num_ids=30)
    theirs = TorchrecEC(tables=configs)
    ours = rectables.EmbeddingCollection.from_configs(configs)
    _copy_from_torchrec(ours, theirs)
    a, b = theirs(kjt), ours(kjt)
    for f in ["a", "b"]:
        torch.testing.assert_close(a[f].values(), b[f].values())
        assert torch.equal(a[f].lengths(), b[f].lengths())


def test_methods_key_that_names_no_table_raises():
    configs = [EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=100, feature_names=["user"])]
    with pytest.raises(ValueError, match=r"\['user'\].*t_user"):
        rectables.EmbeddingBagCollection.from_configs(configs, methods={"user": "hash"})


@pytest.mark.parametrize("field", [
    {"data_type": __import__("torchrec").modules.embedding_configs.DataType.INT8},
    {"need_pos": True},
    {"num_embeddings_post_pruning": 5},
    {"use_virtual_table": True},
])
def test_config_fields_not_honoured_are_rejected(field):
    config = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["a"], **field)
    with pytest.raises(ValueError, match=rf"table 't': .*{next(iter(field)).replace('data_type', 'INT8')}"):
        rectables.EmbeddingBagCollection.from_configs([config])
    plain = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["a"])
    rectables.EmbeddingBagCollection.from_configs([plain])  # torchrec's defaults are fine


@pytest.mark.parametrize("pooled", [True, False])
def test_one_feature_in_two_tables_uses_torchrec_names(pooled):
    cls = TorchrecEBC if pooled else TorchrecEC
    Config = EmbeddingBagConfig if pooled else EmbeddingConfig
    configs = [Config(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a", "b"]),
               Config(name="t2", embedding_dim=8, num_embeddings=20, feature_names=["a"])]
    theirs = cls(tables=configs)
    ours = (rectables.EmbeddingBagCollection if pooled else rectables.EmbeddingCollection).from_configs(configs)
    _copy_from_torchrec(ours, theirs)
    kjt = random_kjt(["b", "a"], 4, 3, num_ids=20)
    a, b = theirs(kjt), ours(kjt)
    if pooled:
        assert b.keys() == a.keys() == ["a@t1", "b", "a@t2"]
        torch.testing.assert_close(a.values(), b.values())
    else:
        assert sorted(b) == sorted(a) == ["a@t1", "a@t2", "b"]
        for k in a:
            torch.testing.assert_close(a[k].values(), b[k].values())
