"""OptEmbed's embedding train step against ``full``'s, interleaved in one process.

Criteo Kaggle cardinalities (26 features, one id each, Zipf(1.05) ids, as
embedding_step.py), dim 16, batch 4096: forward + backward + SGD update with a fixed
upstream gradient, plus for the supernet its threshold loss and the thresholds' Adam
step.  Configurations: ``full``; the OptEmbed supernet (row mask with the
straight-through step, sampled dim prefixes); the retrain (mask and dims fixed: half of
every feature's rows kept, dims 8); the exported ``compact`` tables of that retrain.

    python benchmarks/optembed_step.py [ROUNDS]  ->  one JSON line of median ms per step
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from embedding_step import BATCH, DIM, WARMUP, collection_step, zipf_batches  # run as a script: benchmarks/ is on the path
from rectables.presets import CRITEO_FEATURES, CRITEO_KAGGLE

CONFIGS = ["full", "optembed_supernet", "optembed_retrain", "compact"]
DLRM_CONFIGS = ["dlrm_full", "dlrm_supernet"]


def build(config: str):
    import rectables

    method = config if config in ("full", "compact") else "optembed"
    half = lambda n: {"rows": [(n + 1) // 2], "dims": [DIM // 2]} if method == "compact" else {}  # noqa: E731
    tables = [rectables.create_table(method, name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=n, **half(n))
              for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)]
    ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("sgd", lr=0.01))
    if config == "optembed_retrain":
        for t, n in zip(tables, CRITEO_KAGGLE):
            t.fix((torch.arange(n) % 2 == 0).unsqueeze(0), [DIM // 2])
    return collection_step(ebc)


def build_dlrm(config: str):
    """A DLRM train step (e2e_dlrm.py's shapes: loss, backward, dense Adam) over ``full`` or
    the OptEmbed supernet (with its threshold loss and the thresholds in the optimizer)."""
    import rectables
    from e2e_dlrm import DENSE_ARCH, OVER_ARCH
    from models.dlrm import DLRM
    from rectables.memory import dense_param_groups
    from rectables.registry import table_class
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    F = len(CRITEO_KAGGLE)
    lengths = torch.ones(F * BATCH, dtype=torch.int64)
    offsets = torch.arange(F * BATCH + 1, dtype=torch.int64)
    method = "full" if config == "dlrm_full" else "optembed"
    tables = table_class(method).for_budget_all(DIM, CRITEO_FEATURES, CRITEO_KAGGLE, 1.0)
    ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("rowwise_adagrad", lr=0.05))
    model = DLRM(ebc, 13, DENSE_ARCH, OVER_ARCH)
    opt = torch.optim.Adam(dense_param_groups(model, 1e-3), lr=1e-3, fused=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    dense, labels = torch.log1p(torch.rand(BATCH, 13, generator=gen) * 100), (torch.rand(BATCH, generator=gen) < 0.25).float()

    def step(ids):
        kjt = KeyedJaggedTensor(keys=CRITEO_FEATURES, values=ids, lengths=lengths, offsets=offsets, stride=BATCH)
        loss = loss_fn(model(dense, kjt), labels)
        extra = ebc.extra_loss()
        opt.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward()
        opt.step()
    return step


def run(configs: list[str], rounds: int = 8, steps: int = 10) -> dict:
    """Median ms per step of each configuration, interleaved round by round in this process."""
    torch.set_flush_denormal(True)  # as e2e_dlrm.py: repeated batches otherwise drive the MLPs into denormals
    batches = zipf_batches(WARMUP + steps)
    fns = {c: build_dlrm(c) if c.startswith("dlrm") else build(c) for c in configs}
    for f in fns.values():
        for i in range(WARMUP):
            f(batches[i])
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        for c, f in fns.items():
            t0 = time.perf_counter()
            for b in batches[WARMUP:]:
                f(b)
            times[c].append((time.perf_counter() - t0) * 1000 / steps)
    return {c: statistics.median(v) for c, v in times.items()} | {"spread": times}


if __name__ == "__main__":  # CONFIGS or DLRM_CONFIGS, [rounds]
    which = DLRM_CONFIGS if sys.argv[1:2] == ["dlrm"] else CONFIGS
    print(json.dumps(run(which, int(sys.argv[2]) if len(sys.argv) > 2 else 8)))
