"""Small builders shared by the tests."""
from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from rectables.registry import table_class

NUM_IDS = 300  # above compositional's plain threshold (200)
DIM = 8

#: the setting of each method that must equal ``full`` exactly (every method needs one)
DEGENERATE = {
    "full": {"num_ids": NUM_IDS},
    "hash": {"num_buckets": NUM_IDS, "mix": False},
    "multihash": {"num_buckets": NUM_IDS, "num_hashes": 1, "mix": False},
    "unified": {"buckets_per_table": NUM_IDS, "num_tables": 1, "num_chunks": 1, "mix": False},
    "compositional": {"num_ids": NUM_IDS, "threshold": NUM_IDS},
    # every id admitted on sight, room for all, no eviction: ``full`` over ids renumbered in
    # order of first occurrence (see first_seen_order)
    "dynamic": {"max_rows": NUM_IDS, "min_count": 0, "eviction": None},
    # every row far above its threshold (the step's derivative is 0 there), all dims kept
    "optembed": {"num_ids": NUM_IDS, "alpha": 0.0, "threshold_init": -10.0, "candidate_dims": [DIM]},
    "compact": {"num_ids": NUM_IDS},
}


def first_seen_order(kjt):
    """The KJT with each feature's ids renumbered 0, 1, ... in order of first occurrence
    (the rows a degenerate ``dynamic`` table gives them)."""
    out = []
    for f in kjt.keys():
        v = kjt[f].values()
        order = {}
        out += [order.setdefault(int(x), len(order)) for x in v]
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.tensor(out, dtype=torch.int64),
                                               lengths=kjt.lengths())


def random_kjt(features: list[str], batch: int, max_len: int, num_ids: int = NUM_IDS, gen=None, high=None):
    """KJT with lengths in [0, max_len] and ids in [0, num_ids) (or [-high, high) raw)."""
    gen = gen or torch.Generator().manual_seed(0)
    lengths = torch.randint(0, max_len + 1, (len(features) * batch,), generator=gen)
    n = int(lengths.sum())
    if high is None:
        values = torch.randint(0, num_ids, (n,), generator=gen)
    else:
        values = torch.randint(-high, high, (n,), generator=gen)
    return KeyedJaggedTensor.from_lengths_sync(keys=features, values=values, lengths=lengths)


def small_table(method: str, features: list[str], name: str = "t", pooling: str = "sum", fraction: float = 0.5, dim=DIM):
    cls = table_class(method)
    t = cls.for_budget(name, dim, features, NUM_IDS, 1.0 if cls.no_budget else fraction, seed=3)
    t.pooling = pooling
    return t


def collection(method: str, features=("a", "b"), optimizer="sgd", lr=0.1, pooled=True, **kw):
    cls = rectables.EmbeddingBagCollection if pooled else rectables.EmbeddingCollection
    tables = [small_table(method, [f], name=f"t_{f}", **kw) for f in features]
    return cls(tables, rectables.SparseOptimizer(optimizer, lr=lr))


def all_weights(ebc) -> dict:
    """Copies of the fused weights, one flat tensor per storage group."""
    return {g: s.tbe.weights_host.detach().clone() for g, s in ebc.storages.items()}


def weights(ebc) -> torch.Tensor:
    """Copy of every fused weight of the collection, flat."""
    return torch.cat(list(all_weights(ebc).values()))
