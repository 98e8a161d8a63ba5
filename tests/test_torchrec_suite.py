"""What torchrec 1.8.0's own tests assert of its EmbeddingBagCollection, EmbeddingCollection,
DLRM and SimpleDeepFMNN (torchrec/modules/tests/test_embedding_modules.py,
torchrec/models/tests/test_dlrm.py, test_deepfm.py), checked again here with only the
module under test swapped for rectables' (method ``full``).  Where torchrec's test
compares against numbers, this file compares against torchrec's own module built from
the same seed.  fx and TorchScript run the inference lookup (``rectables/traceable.py``)
and must give the eager output.  Left out: torchrec's tests of its own helpers
(construct_jagged_tensors, the interaction archs), which take no embedding module."""
from functools import partial

import pytest
import torch
import torchrec.models.deepfm as tr_deepfm
import torchrec.models.dlrm as tr_dlrm
from torch.testing import FileCheck
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection as TorchrecEBC
from torchrec.modules.embedding_modules import EmbeddingCollection as TorchrecEC
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

import rectables

EBC, EC = rectables.EmbeddingBagCollection, rectables.EmbeddingCollection


def bag_config(name, dim, feats, n=10, **kw):
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=n, feature_names=feats, **kw)


def seq_config(name, dim, feats, n=10):
    return EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=n, feature_names=feats)


def kjt(keys, values, offsets, weights=None, device=None):
    t = partial(torch.tensor, device=device)
    return KeyedJaggedTensor.from_offsets_sync(keys=keys, values=t(values), offsets=t(offsets),
                                               weights=None if weights is None else t(weights))


TWO_BY_THREE = (["f1", "f2"], [0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 2, 3, 4, 5, 8])  # 2 features x 3 bags
WEIGHTED = (["f1", "f3", "f2"], [1, 2, 4, 5, 4, 3, 2, 9, 1, 3, 4, 7], [0, 2, 4, 6, 8, 10, 12],
            [0.1, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2, 0.9, 0.1, 0.3, 0.4, 0.7])


def same_as_torchrec(make, configs, features, **kw):
    """Output of torchrec's module and ours, each built after the same seed."""
    torch.manual_seed(0)
    theirs = make[0](tables=configs, **kw)(features)
    torch.manual_seed(0)
    ours = make[1](tables=configs, **kw)(features)
    return theirs, ours


# ---- EmbeddingBagCollection ---------------------------------------------------------

def test_ebc_unweighted_with_init_fns():
    configs = [bag_config("t1", 3, ["f1"], init_fn=partial(torch.nn.init.normal_, mean=0.0, std=1.5)),
               bag_config("t2", 4, ["f2"], init_fn=partial(torch.nn.init.uniform_, a=-0.036, b=0.036))]
    theirs, ours = same_as_torchrec((TorchrecEBC, EBC), configs, kjt(*TWO_BY_THREE))
    assert ours.values().size() == (3, 7) and ours.keys() == ["f1", "f2"] and ours.offset_per_key() == [0, 3, 7]
    torch.testing.assert_close(ours.values(), theirs.values())


def test_ebc_shared_tables():
    theirs, ours = same_as_torchrec((TorchrecEBC, EBC), [bag_config("t1", 3, ["f1", "f2"])], kjt(*TWO_BY_THREE))
    assert ours.values().size() == (3, 6) and ours.keys() == ["f1", "f2"] and ours.offset_per_key() == [0, 3, 6]
    torch.testing.assert_close(ours.values(), theirs.values())


def test_ebc_shared_features():
    configs = [bag_config("t1", 3, ["f1"]), bag_config("t2", 4, ["f1"])]
    theirs, ours = same_as_torchrec((TorchrecEBC, EBC), configs, kjt(["f1"], *TWO_BY_THREE[1:]))
    assert ours.values().size() == (6, 7) and ours.keys() == ["f1@t1", "f1@t2"] and ours.offset_per_key() == [0, 3, 7]
    torch.testing.assert_close(ours.values(), theirs.values())


def test_ebc_weighted():
    configs = [bag_config("t1", 3, ["f1", "f3"]), bag_config("t2", 4, ["f2"])]
    theirs, ours = same_as_torchrec((TorchrecEBC, EBC), configs, kjt(*WEIGHTED), is_weighted=True)
    assert ours.values().size() == (2, 10) and ours.keys() == ["f1", "f3", "f2"]
    assert ours.offset_per_key() == [0, 3, 6, 10]
    torch.testing.assert_close(ours.values(), theirs.values())


def test_ebc_forward_on_meta_device():
    configs = [bag_config("t1", 3, ["f1", "f3"]), bag_config("t2", 4, ["f2"])]
    ebc = EBC(tables=configs, is_weighted=True, device=torch.device("meta"))
    out = ebc(kjt(*WEIGHTED, device="meta"))
    assert out.values().size() == (2, 10) and out.keys() == ["f1", "f3", "f2"]
    assert out.offset_per_key() == [0, 3, 6, 10] and out.values().device == torch.device("meta")


def test_ebc_duplicate_table_name_fails():
    with pytest.raises(ValueError):
        EBC(tables=[bag_config("t1", 3, ["f1"]), bag_config("t1", 4, ["f2"])])


def test_ebc_device():
    config = bag_config("t1", 3, ["f1"])
    ebc = EBC(tables=[config], device=torch.device("meta"))
    assert ebc.embedding_bags["t1"].weight.device == ebc.device == torch.device("meta")
    with torch.device("meta"):
        ebc = EBC(tables=[config])
    assert ebc.embedding_bags["t1"].weight.device == ebc.device == torch.device("meta")
    ebc = EBC(tables=[config])
    assert ebc.embedding_bags["t1"].weight.device == ebc.device == torch.device("cpu")


# ---- EmbeddingCollection ------------------------------------------------------------

SEQ = (["f1", "f2"], [0, 1, 2, 3], [0, 2, 3, 3, 4])


def test_ec_forward():
    configs = [seq_config("t1", 5, ["f1", "f2"]), seq_config("t2", 5, ["f2"])]
    theirs, ours = same_as_torchrec((TorchrecEC, EC), configs, kjt(*SEQ))
    assert isinstance(ours["f1"], JaggedTensor)
    assert ours["f1"].values().size() == (3, 5)
    assert ours["f2@t1"].values().size() == ours["f2@t2"].values().size() == (1, 5)
    for key in theirs:
        torch.testing.assert_close(ours[key].values(), theirs[key].values())


def test_ec_indices():
    configs = [seq_config("t1", 5, ["f1", "f2"]), seq_config("t2", 5, ["f2"])]
    out = EC(tables=configs, need_indices=True)(kjt(*SEQ))
    assert out["f1"].weights().tolist() == [0, 1, 2]
    assert out["f2@t1"].weights().tolist() == out["f2@t2"].weights().tolist() == [3]


def test_ec_device_and_duplicate_name():
    ec = EC(tables=[seq_config("t1", 3, ["f1"])], device=torch.device("meta"))
    assert ec.embeddings["t1"].weight.device == torch.device("meta")
    with pytest.raises(ValueError):
        EC(tables=[seq_config("t1", 2, ["f1"]), seq_config("t1", 3, ["f2"])])


# ---- DLRM ---------------------------------------------------------------------------

DLRM_KJT = (["f1", "f3", "f2"], [1, 2, 4, 5, 4, 3, 2, 9, 1, 2, 3], [0, 2, 4, 6, 8, 10, 11])


def both(build):
    """build(ebc_class) under the same seed, for torchrec's EBC and ours."""
    torch.manual_seed(0)
    theirs = build(TorchrecEBC)
    torch.manual_seed(0)
    return theirs, build(EBC)


def test_dlrm_sparse_arch():
    configs = [bag_config("t1", 3, ["f1", "f3"]), bag_config("t2", 3, ["f2"])]
    theirs, ours = both(lambda cls: tr_dlrm.SparseArch(cls(tables=configs)))
    features = kjt(["f1", "f2", "f3", "f4", "f5"], [1, 2, 4, 5, 4, 3, 2, 9, 1, 2, 4, 5, 4, 3, 2, 9, 1, 2, 3],
                   [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19])
    out = ours(features)
    assert out.shape == (2, len(ours.sparse_feature_names), 3)
    torch.testing.assert_close(out, theirs(features))


@pytest.mark.parametrize("tables", [[("t1", ["f1", "f3"]), ("t2", ["f2"])], [("t2", ["f2"])]])
def test_dlrm(tables):
    configs = [bag_config(n, 8, feats, n=100) for n, feats in tables]
    keys = [f for _, feats in tables for f in feats]
    features = kjt(*DLRM_KJT) if len(keys) == 3 else kjt(["f2"], [0, 1, 2], [0, 2, 3])

    def build(cls):
        return tr_dlrm.DLRM(embedding_bag_collection=cls(tables=configs), dense_in_features=100,
                            dense_arch_layer_sizes=[20, 8], over_arch_layer_sizes=[5, 1])
    theirs, ours = both(build)
    dense = torch.rand((2, 100))
    logits = ours(dense_features=dense, sparse_features=features)
    assert logits.size() == (2, 1)
    torch.testing.assert_close(logits, theirs(dense_features=dense, sparse_features=features))


def test_dlrm_without_tables_fails_as_in_torchrec():
    with pytest.raises(AssertionError):
        tr_dlrm.DLRM(embedding_bag_collection=EBC(tables=[]), dense_in_features=100,
                     dense_arch_layer_sizes=[20, 1], over_arch_layer_sizes=[5, 1])


# ---- DeepFM -------------------------------------------------------------------------

def deepfm(cls, configs):
    return tr_deepfm.SimpleDeepFMNN(num_dense_features=100, embedding_bag_collection=cls(tables=configs),
                                    hidden_layer_size=20, deep_fm_dimension=5)


def test_deepfm():
    configs = [bag_config("t1", 8, ["f1", "f3"], n=100), bag_config("t2", 8, ["f2"], n=100)]
    theirs, ours = both(lambda cls: deepfm(cls, configs))
    dense = torch.rand((2, 100))
    logits = ours(dense_features=dense, sparse_features=kjt(*DLRM_KJT))
    assert logits.size() == (2, 1)
    torch.testing.assert_close(logits, theirs(dense_features=dense, sparse_features=kjt(*DLRM_KJT)))


def test_deepfm_without_tables_fails_as_in_torchrec():
    with pytest.raises(AssertionError):
        deepfm(EBC, [])


# ---- the other DLRM variants (each takes the EBC through SparseArch) -------------------

def test_dlrm_train_projection_and_dcn():
    from torchrec.datasets.utils import Batch

    configs = [bag_config("t1", 8, ["f1", "f3"], n=100), bag_config("t2", 8, ["f2"], n=100)]
    dense = torch.rand((2, 100))
    variants = {
        "projection": lambda cls: tr_dlrm.DLRM_Projection(
            embedding_bag_collection=cls(tables=configs), dense_in_features=100, dense_arch_layer_sizes=[20, 8],
            interaction_branch1_layer_sizes=[32, 32], interaction_branch2_layer_sizes=[32, 32],
            over_arch_layer_sizes=[5, 1]),
        "dcn": lambda cls: tr_dlrm.DLRM_DCN(
            embedding_bag_collection=cls(tables=configs), dense_in_features=100, dense_arch_layer_sizes=[20, 8],
            over_arch_layer_sizes=[5, 1], dcn_num_layers=2, dcn_low_rank_dim=8),
    }
    for build in variants.values():
        theirs, ours = both(build)
        logits = ours(dense_features=dense, sparse_features=kjt(*DLRM_KJT))
        torch.testing.assert_close(logits, theirs(dense_features=dense, sparse_features=kjt(*DLRM_KJT)))
        batch = Batch(dense_features=dense, sparse_features=kjt(*DLRM_KJT), labels=torch.randint(2, (2,)))
        _, (_, out, _) = tr_dlrm.DLRMTrain(ours)(batch)
        assert out.size() == (2,)
    with pytest.raises(ValueError):  # the projection sizes are checked against the EBC's dim
        tr_dlrm.DLRM_Projection(embedding_bag_collection=EBC(tables=configs), dense_in_features=100,
                                dense_arch_layer_sizes=[20, 9], interaction_branch1_layer_sizes=[32, 32],
                                interaction_branch2_layer_sizes=[32, 32], over_arch_layer_sizes=[5, 1])


# ---- fx tracing (torchrec's tracer) and TorchScript: the same lookup as straight-line code ----

def test_ebc_fx_and_scripting():
    configs = [bag_config("t1", 3, ["f1", "f3"]), bag_config("t2", 4, ["f2"])]
    ebc = EBC(tables=configs, is_weighted=True)
    gm = symbolic_trace(ebc)
    scripted = torch.jit.script(gm)
    for module in (gm, scripted, torch.jit.script(ebc)):
        out = module(kjt(*WEIGHTED))
        assert out.values().size() == (2, 10) and out.keys() == ["f1", "f3", "f2"]
        assert out.offset_per_key() == [0, 3, 6, 10]
        torch.testing.assert_close(out.values(), ebc(kjt(*WEIGHTED)).values())


def test_ec_fx_and_scripting():
    configs = [seq_config("t1", 5, ["f1", "f2"]), seq_config("t2", 5, ["f2"])]
    ec = EC(tables=configs)
    gm = symbolic_trace(ec)
    for module in (gm, torch.jit.script(gm), torch.jit.script(ec)):
        out = module(kjt(*SEQ))
        assert out["f1"].values().size() == (3, 5)
        assert out["f2@t1"].values().size() == out["f2@t2"].values().size() == (1, 5)
        torch.testing.assert_close(out["f2@t2"].values(), ec(kjt(*SEQ))["f2@t2"].values())


def test_sparse_arch_and_dlrm_fx_and_script():
    configs = [bag_config("t1", 3, ["f1", "f3"]), bag_config("t2", 3, ["f2"])]
    sparse_arch = tr_dlrm.SparseArch(EBC(tables=configs))
    gm = symbolic_trace(sparse_arch)
    FileCheck().check("KeyedJaggedTensor").check("cat").run(gm.code)
    features = kjt(*DLRM_KJT)
    assert gm(features).shape == (2, 3, 3)
    torch.jit.script(gm)
    dlrm = tr_dlrm.DLRM(embedding_bag_collection=EBC(tables=[bag_config("t2", 8, ["f2"], n=100)]),
                        dense_in_features=100, dense_arch_layer_sizes=[20, 8], over_arch_layer_sizes=[5, 1])
    gm = symbolic_trace(dlrm)
    FileCheck().check("KeyedJaggedTensor").check("f2").run(gm.code)
    dense, sparse = torch.rand((2, 100)), kjt(["f2"], [0, 1, 2], [0, 2, 3])
    assert gm(dense_features=dense, sparse_features=sparse).size() == (2, 1)
    torch.testing.assert_close(torch.jit.script(gm)(dense, sparse), dlrm(dense_features=dense, sparse_features=sparse))


def test_deepfm_fx_and_script():
    model = deepfm(EBC, [bag_config("t1", 8, ["f1", "f3"], n=100), bag_config("t2", 8, ["f2"], n=100)])
    gm = symbolic_trace(model)
    FileCheck().check("KeyedJaggedTensor").check("f2").run(gm.code)
    dense = torch.rand((2, 100))
    torch.testing.assert_close(torch.jit.script(gm)(dense, kjt(*DLRM_KJT)), model(dense, kjt(*DLRM_KJT)))


@pytest.mark.parametrize("wrapper", ["dlrm", "deepfm"])
@pytest.mark.parametrize("keys, values, offsets", [(DLRM_KJT[0], DLRM_KJT[1], DLRM_KJT[2]), (["f1"], [], [0, 0, 0])])
def test_model_wrappers_eval_and_train(wrapper, keys, values, offsets):
    from torchrec.distributed.test_utils.model_input import ModelInput

    configs = ([bag_config("t1", 8, ["f1", "f3"], n=100), bag_config("t2", 8, ["f2"], n=100)] if len(keys) == 3
               else [bag_config("t1", 8, ["f1"], n=100)])
    if wrapper == "dlrm":
        model = tr_dlrm.DLRMWrapper(embedding_bag_collection=EBC(tables=configs), dense_in_features=100,
                                    dense_arch_layer_sizes=[20, 8], over_arch_layer_sizes=[5, 1])
    else:
        model = tr_deepfm.SimpleDeepFMNNWrapper(num_dense_features=100, embedding_bag_collection=EBC(tables=configs),
                                                hidden_layer_size=20, deep_fm_dimension=5)
    sparse = KeyedJaggedTensor.from_offsets_sync(keys=keys, values=torch.tensor(values, dtype=torch.long),
                                                 offsets=torch.tensor(offsets, dtype=torch.long))
    batch = ModelInput(float_features=torch.rand((2, 100)), idlist_features=sparse, idscore_features=None,
                       label=torch.rand((2,)))
    model.eval()
    assert model(batch).size() == (2, 1)
    model.train()
    loss, pred = model(batch)
    assert loss.size() == () and pred.size() == (2, 1)


def test_dlrm_dcn_checks_dense_size_and_exports():
    configs = [bag_config("t1", 8, ["f1"], n=100), bag_config("t2", 8, ["f2"], n=100)]
    with pytest.raises(ValueError):
        tr_dlrm.DLRM_DCN(embedding_bag_collection=EBC(tables=configs), dense_in_features=100,
                         dense_arch_layer_sizes=[20, 9], dcn_num_layers=2, dcn_low_rank_dim=8, over_arch_layer_sizes=[5, 1])
    model = tr_dlrm.DLRM(embedding_bag_collection=EBC(tables=configs), dense_in_features=100,
                         dense_arch_layer_sizes=[20, 8], over_arch_layer_sizes=[5, 1])
    dense, sparse = torch.rand((2, 100)), kjt(["f1", "f2"], [1, 2, 4, 5, 4, 3, 2, 9], [0, 2, 4, 6, 8])
    program = torch.export.export(model, (dense, sparse), {}, strict=False)  # as torchrec's export test, less its IR
    torch.testing.assert_close(program.module()(dense, sparse), model(dense, sparse))
