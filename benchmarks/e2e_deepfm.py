"""DeepFM train step at the Criteo Kaggle cardinalities (33.8M ids), dim 16, batch 4096,
DNN 256-128 (deepctr-torch's default): rectables DeepFM over a `full` collection (fused
TBE, our sparse row-wise Adam on the touched rows, torch Adam on the dense layers)
against deepctr-torch 0.3.0's DeepFM (dense nn.Embedding tables, torch Adam on every
parameter, its own fit() step body; L2 regularisation off on both sides).

    python benchmarks/e2e_deepfm.py CONFIG  ->  one JSON line (one configuration per process)

deepctr-torch is a benchmark-only dependency (requirements-bench.lock, installed by `make bench`).
"""
from __future__ import annotations

import json
import sys

import torch

from e2e_dlrm import model_batches, time_steps
from embedding_step import BATCH, DIM
from rectables.presets import CRITEO_FEATURES, CRITEO_KAGGLE

HIDDEN = [256, 128]
CONFIGS = ["deepctr_deepfm", "full"]
DENSE_NAMES = [f"I{i}" for i in range(1, 14)]


def build(config: str):
    F = len(CRITEO_KAGGLE)
    if config == "deepctr_deepfm":
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import DeepFM as DeepctrDeepFM

        columns = [SparseFeat(f, vocabulary_size=n, embedding_dim=DIM) for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)]
        columns += [DenseFeat(d, 1) for d in DENSE_NAMES]
        model = DeepctrDeepFM(columns, columns, dnn_hidden_units=tuple(HIDDEN), l2_reg_linear=0, l2_reg_embedding=0,
                              task="binary", device="cpu")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.functional.binary_cross_entropy

        def step(ids, dense, labels):
            x = torch.cat([ids.view(F, BATCH).t().float(), dense], 1)  # deepctr's input: ids as floats
            y_pred = model(x).squeeze(-1)
            opt.zero_grad()
            loss = loss_fn(y_pred, labels, reduction="sum") + model.get_regularization_loss() + model.aux_loss
            loss.backward()
            opt.step()
        return step

    import rectables
    from models.deepfm import DeepFM
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    tables = [rectables.create_table("full", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=n)
              for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)]
    ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("adam", lr=1e-3))
    model = DeepFM(ebc, 13, HIDDEN)
    opt = torch.optim.Adam(rectables.dense_parameters(model), lr=1e-3, fused=True)
    lengths = torch.ones(F * BATCH, dtype=torch.int64)
    offsets = torch.arange(F * BATCH + 1, dtype=torch.int64)

    def step(ids, dense, labels):
        kjt = KeyedJaggedTensor(keys=CRITEO_FEATURES, values=ids, lengths=lengths, offsets=offsets, stride=BATCH)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def run(config: str) -> dict:
    batches = model_batches(3)
    warmup, steps = (1, 3) if config == "deepctr_deepfm" else (4, 10)  # deepctr: ~6 s per step
    return time_steps(config, build(config), batches, warmup, steps)


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(run(sys.argv[1])))
