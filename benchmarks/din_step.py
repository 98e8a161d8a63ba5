"""DIN train step: rectables DIN (models/din.py) over a `full` unpooled collection against
deepctr-torch 0.3.0's DIN at the same shapes: 100,000 items and 1,000 categories (item and
category embeddings concatenated), dim 16, histories of 1-50 items (uniform), Zipf (1.05)
ids, batch 1024, attention MLP 80-40 and MLP 200-80, raw attention weights (no softmax);
Dice in both of our MLPs, in deepctr's attention and PReLU in its MLP (its Dice rejects 2-d
input there).  Optimizers: ours row-wise Adagrad (fused) on the tables and torch's fused
Adam on the dense parameters, as rectables' training loop; deepctr Adam on everything,
its dense tables included, as its fit() does.  L2 regularisation off on both sides.
Interleaved in one process, median per-step time.

    python benchmarks/din_step.py [steps]  ->  one JSON line
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

ITEMS, CATS, DIM, BATCH, MAXLEN = 100_000, 1_000, 16, 1024, 50
ATT, HIDDEN = (80, 40), (200, 80)


def batches(n: int, seed: int = 0):
    """n batches of (target [B], lengths [B], history [B, MAXLEN] zero-padded at the end
    with ids from 1 (deepctr pads with 0), labels [B])."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lens = rng.integers(1, MAXLEN + 1, BATCH)
        hist = ((rng.zipf(1.05, (BATCH, MAXLEN)) - 1) % (ITEMS - 1)) + 1
        hist[np.arange(MAXLEN)[None, :] >= lens[:, None]] = 0
        target = ((rng.zipf(1.05, BATCH) - 1) % (ITEMS - 1)) + 1
        out.append((target, lens, hist, (rng.random(BATCH) < 0.5).astype(np.float32)))
    return out


def ours():
    import rectables
    from models.din import DIN
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    opt = rectables.SparseOptimizer("rowwise_adagrad", lr=0.05)
    tables = [rectables.create_table("full", name="t_item", embedding_dim=DIM, feature_names=["item"], num_ids=ITEMS),
              rectables.create_table("full", name="t_cat", embedding_dim=DIM, feature_names=["cat"], num_ids=CATS)]
    model = DIN(rectables.EmbeddingCollection(tables, opt), ATT, HIDDEN, "dice")
    dense = torch.optim.Adam(rectables.dense_parameters(model), lr=1e-3, fused=True)  # as the training loop
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def prepare(b):
        target, lens, hist, y = b
        items = np.r_[target, hist[hist > 0]]  # row-major: each history in order
        lengths = torch.from_numpy(np.r_[np.ones(BATCH, np.int64), lens])
        values = torch.from_numpy(np.r_[items, items % CATS])
        kjt = KeyedJaggedTensor.from_lengths_sync(["item", "cat"], values, torch.cat([lengths, lengths]))
        return torch.zeros(BATCH, 0), kjt, torch.from_numpy(y)

    def step(b):
        d, kjt, y = b
        loss = loss_fn(model(d, kjt), y)
        dense.zero_grad()
        loss.backward()
        dense.step()
    return prepare, step


def deepctr():
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN as DeepctrDIN

    cols = [SparseFeat("item", ITEMS, embedding_dim=DIM), SparseFeat("cat", CATS, embedding_dim=DIM),
            VarLenSparseFeat(SparseFeat("hist_item", ITEMS, embedding_dim=DIM, embedding_name="item"), MAXLEN,
                             length_name="seq_length"),
            VarLenSparseFeat(SparseFeat("hist_cat", CATS, embedding_dim=DIM, embedding_name="cat"), MAXLEN,
                             length_name="seq_length")]
    model = DeepctrDIN(cols, ["item", "cat"], dnn_hidden_units=HIDDEN, dnn_activation="prelu", att_hidden_size=ATT,
                       att_activation="Dice", l2_reg_embedding=0, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def prepare(b):
        target, lens, hist, y = b
        x = np.concatenate([target[:, None], (target % CATS)[:, None], hist, np.where(hist > 0, hist % CATS, 0),
                            lens[:, None]], 1)
        return torch.from_numpy(x).float(), torch.from_numpy(y)

    def step(b):
        x, y = b
        pred = model(x).squeeze(-1)
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(pred, y, reduction="sum") + model.get_regularization_loss()
        loss.backward()
        opt.step()
    return prepare, step


def main(steps: int = 30) -> dict:
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    data = batches(8)
    sides = {"rectables": ours(), "deepctr": deepctr()}
    prepared = {k: [prep(b) for b in data] for k, (prep, _) in sides.items()}
    times = {k: [] for k in sides}
    for i in range(steps + 3):
        for k in (list(sides) if i % 2 else list(sides)[::-1]):
            t0 = time.perf_counter()
            sides[k][1](prepared[k][i % len(data)])
            if i >= 3:  # the first steps compile Dice and warm up
                times[k].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"ms": ms, "samples_per_s": {k: BATCH / v * 1000 for k, v in ms.items()},
            "speedup": ms["deepctr"] / ms["rectables"], "steps": steps, "batch": BATCH}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)))
