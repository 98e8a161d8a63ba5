"""Unified Embedding accuracy protocol on MovieLens-100k (TensorFlow Recommenders tutorial).

label = rating >= 3; seeded shuffle, 80,000 train / 20,000 test; six features;
concatenated embeddings (dim 16) -> Dense 128 -> Dense 64 -> logit; Adam lr 0.01 (dense
layers: torch Adam; tables: our sparse row-wise Adam), 5 epochs, batch 8192, 5 seeds.

    python benchmarks/movielens_ue.py  ->  JSON lines, one per (method, setting, seed)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import rectables
from data.movielens import FEATURES, load_movielens
from models.layers import mlp
from rectables.metrics import StreamingMetrics
from rectables.registry import table_class

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"
DIM, EPOCHS, BATCH, LR, SEEDS = 16, 5, 8192, 0.01, 5
PUBLISHED_FLOATS = 2 * 1440 * 8  # UE: 2 tables x 1,440 buckets x dim 8 (= hashing's 1,440 rows x 16)


def tables_for(method: str, setting: str, cards: list[int], seed: int):
    if method == "full":
        return [rectables.create_table("full", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=n)
                for f, n in zip(FEATURES, cards)]
    if setting == "published":
        if method == "unified":
            return [rectables.create_table("unified", name="ue", embedding_dim=DIM, feature_names=FEATURES,
                                           buckets_per_table=1440, num_tables=2, num_chunks=2, seed=seed)]
        if method in ("hash", "multihash"):  # 1,440 rows in all, 240 per feature
            return [rectables.create_table(method, name=f"t_{f}", embedding_dim=DIM, feature_names=[f],
                                           num_buckets=240, seed=seed + i) for i, f in enumerate(FEATURES)]
        fraction = PUBLISHED_FLOATS / (DIM * sum(cards))
    else:
        fraction = 0.25
    return table_class(method).for_budget_all(DIM, FEATURES, cards, fraction, seed)


def run(method: str, setting: str, seed: int, ids, labels, cards) -> dict:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    train, test = order[:80_000], order[80_000:]
    torch.manual_seed(seed)
    ebc = rectables.EmbeddingBagCollection(tables_for(method, setting, cards, seed), rectables.SparseOptimizer("adam", lr=LR))
    head = mlp([sum(ebc.dims), 128, 64, 1], last_activation=False)
    opt = torch.optim.Adam(head.parameters(), lr=LR)

    def forward(rows):
        kjt = KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.from_numpy(np.ascontiguousarray(ids[rows].T)).reshape(-1),
                                                  torch.ones(len(rows) * len(FEATURES), dtype=torch.int64))
        return head(ebc(kjt).values()).squeeze(1)

    for epoch in range(EPOCHS):
        perm = train[np.random.default_rng([seed, epoch]).permutation(len(train))]
        for s in range(0, len(perm), BATCH):
            rows = perm[s : s + BATCH]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(rows), torch.from_numpy(labels[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    m = StreamingMetrics()
    with torch.no_grad():
        m.update(forward(test), torch.from_numpy(labels[test]))
    floats = sum(t_rows * d for t in ebc.tables for t_rows, d in t.physical_shapes())
    return {"method": method, "setting": setting, "seed": seed, "floats": floats, **m.result()}


def main() -> None:
    torch.set_num_threads(2)
    ids, labels, cards = load_movielens(DATA)
    configs = [("full", "full")] + [(m, s) for s in ("published", "quarter")
                                    for m in ("hash", "multihash", "unified", "compositional")]
    for method, setting in configs:
        for seed in range(SEEDS):
            print(json.dumps(run(method, setting, seed, ids, labels, cards)), flush=True)


if __name__ == "__main__":
    main()
