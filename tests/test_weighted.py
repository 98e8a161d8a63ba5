"""Per-id weights (torchrec's weighted KJT) for every method: each id's vector is scaled
by its weight before pooling; mean divides the weighted sum by the bag length (fbgemm)."""
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection as TorchrecEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from tests.helpers import NUM_IDS, small_table, weights

METHODS = rectables.list_tables()


def weighted_ebc(method, pooling="sum", optimizer="sgd"):
    tables = [small_table(method, [f], name=f"t_{f}", pooling=pooling) for f in ("a", "b")]
    return rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer(optimizer, lr=0.1), is_weighted=True)


def batch(gen, B=4, max_len=3):
    lengths = torch.randint(0, max_len + 1, (2 * B,), generator=gen)
    n = int(lengths.sum())
    values = torch.randint(0, NUM_IDS, (n,), generator=gen)
    w = torch.rand(n, generator=gen) * 2 - 0.5
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=values, lengths=lengths, weights=w)


def per_id(ebc, kjt):
    """Each id's own vector [N, D] per feature, from bags of one id with weight 1."""
    out = []
    for f, key in enumerate(["a", "b"]):
        ids = kjt[key].values()
        single = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.cat([ids, ids]), weights=torch.ones(2 * len(ids)),
            lengths=torch.ones(2 * len(ids), dtype=torch.int64))
        with torch.no_grad():
            out.append(ebc(single).values()[:, f * 8 : (f + 1) * 8])
    return out


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("method", METHODS)
def test_weighted_pooling_is_the_weighted_sum_of_each_ids_vector(method, pooling):
    gen = torch.Generator().manual_seed(1)
    ebc = weighted_ebc(method, pooling)
    kjts = [batch(gen, max_len=max_len) for max_len in (1, 3)]  # one id per bag (mult tables pool the
    with torch.no_grad():                                        # KJT's bags) and longer bags
        for kjt in kjts + kjts:  # training lookups: a dynamic table admits ids (min_count 2)
            ebc(kjt)
    ebc.eval()  # then reads only, so the per-id lookups see the same rows
    for kjt in kjts:
        with torch.no_grad():
            got = ebc(kjt).values()
        vecs = per_id(ebc, kjt)
        for f, key in enumerate(["a", "b"]):
            jt = kjt[key]
            bag = torch.repeat_interleave(torch.arange(4), jt.lengths())
            want = torch.zeros(4, 8).index_add_(0, bag, vecs[f] * jt.weights().unsqueeze(1))
            if pooling == "mean":
                want = want / jt.lengths().clamp(min=1).unsqueeze(1)
            torch.testing.assert_close(got[:, f * 8 : (f + 1) * 8], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weighted_update_scales_each_ids_gradient(method, optimizer):
    """One step with weights w equals one step where each id appears as a bag of its own
    with its vector scaled by w: compare against doubling an id's weight vs repeating it."""
    gen = torch.Generator().manual_seed(2)
    a, b = weighted_ebc(method, optimizer=optimizer), weighted_ebc(method, optimizer=optimizer)
    ids = torch.randint(0, NUM_IDS, (5,), generator=gen)
    lengths = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    twice = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=ids, lengths=lengths, weights=torch.full((5,), 2.0))
    repeated = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=ids.repeat_interleave(2),
                                                   lengths=lengths * 2, weights=torch.ones(10))
    with torch.no_grad():  # a dynamic table admits the ids alike in both (two occurrences: min_count 2)
        a(repeated), b(repeated)
    for s, t in zip(a.storages.values(), b.storages.values()):
        t.tbe.weights_host.data.copy_(s.tbe.weights_host.data)
    target = torch.randn(5, 16, generator=gen)
    (a(twice).values() * target).sum().backward()
    (b(repeated).values() * target).sum().backward()
    torch.testing.assert_close(weights(a), weights(b), rtol=1e-5, atol=1e-6)


def test_full_matches_torchrec_weighted_ebc_forward_and_sgd_step():
    configs = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["a", "b"]),
               EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=20, feature_names=["c"])]
    theirs = TorchrecEBC(tables=configs, is_weighted=True)
    ours = rectables.EmbeddingBagCollection.from_configs(configs, optimizer=rectables.SparseOptimizer("sgd", lr=0.5),
                                                         is_weighted=True)
    for k, t in enumerate(ours.tables):
        ours.storage.weight(k).copy_(theirs.embedding_bags[t.name].weight.detach())
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 4, (9,), generator=gen)
    n = int(lengths.sum())
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["c", "a", "b"], values=torch.randint(0, 20, (n,), generator=gen),
                                              lengths=lengths, weights=torch.rand(n, generator=gen))
    a, b = theirs(kjt), ours(kjt)
    assert a.keys() == b.keys()
    torch.testing.assert_close(a.values(), b.values())
    target = torch.randn(3, 20, generator=gen)
    (a.values() * target).sum().backward()
    (b.values() * target).sum().backward()
    with torch.no_grad():
        for p in theirs.parameters():
            p -= 0.5 * p.grad
    for k, t in enumerate(ours.tables):
        torch.testing.assert_close(ours.storage.weight(k), theirs.embedding_bags[t.name].weight.detach())


def test_weights_must_match_the_collection():
    ebc = weighted_ebc("full")
    plain = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="needs per-id weights"):
        ebc(plain)
    unweighted = rectables.EmbeddingBagCollection([small_table("full", ["a"]), small_table("full", ["b"], name="u")])
    with pytest.raises(ValueError, match="would ignore"):
        unweighted(KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2]),
                                                       lengths=torch.tensor([1, 1]), weights=torch.ones(2)))
