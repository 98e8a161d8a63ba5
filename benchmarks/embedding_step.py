"""Embedding train step (forward + backward + update, fixed upstream gradient).

Criteo Kaggle cardinalities, 26 features with one id each, Zipf(1.05) ids, dim 16,
batch 4096.  Run one configuration per process so peak RSS is that configuration's:

    python benchmarks/embedding_step.py CONFIG  ->  one JSON line
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np
import torch

from rectables.presets import CRITEO_FEATURES, CRITEO_KAGGLE

DIM, BATCH, WARMUP, STEPS = 16, 4096, 3, 20
CONFIGS = ["tbe", "full", "hash_1m", "qr_m4", "qr_sqrt", "qr_sqrt_add", "unified_1/4", "unified_1/64", "unified_k1_1/4",
           "nn_embeddingbag", "torchrec_ebc"]


def zipf_batches(n_batches: int, seed: int = 0) -> list[torch.Tensor]:
    """[F*B] ids per batch, feature-major; Zipf(1.05) ranks scattered over [0, n_f)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        cols = []
        for n in CRITEO_KAGGLE:
            rank = (rng.zipf(1.05, BATCH) - 1) % n
            cols.append((rank * 2654435761) % n)  # hot ids spread over the table
        out.append(torch.from_numpy(np.concatenate(cols)).long())
    return out


def collection_step(ebc):
    """step(ids [F*B]) of a rectables collection over the 26 features, one id each: the
    lookup and the backward of a fixed upstream gradient (fused update), plus the tables'
    extra loss, whose own parameters (OptEmbed's thresholds) a dense Adam steps."""
    from rectables.memory import dense_param_groups
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    F = len(CRITEO_KAGGLE)
    lengths = torch.ones(F * BATCH, dtype=torch.int64)
    offsets = torch.arange(F * BATCH + 1, dtype=torch.int64)
    grad = torch.randn(BATCH, F * DIM, generator=torch.Generator().manual_seed(0))
    groups = dense_param_groups(ebc, 1e-3)
    dense = torch.optim.Adam(groups, lr=1e-3, fused=True) if groups else None  # as the training loop

    def step(ids):
        kjt = KeyedJaggedTensor(keys=CRITEO_FEATURES, values=ids, lengths=lengths, offsets=offsets, stride=BATCH)
        out, loss = ebc(kjt).values(), ebc.extra_loss()
        torch.autograd.backward([out] if loss is None else [out, loss], [grad] if loss is None else [grad, None])
        if dense:
            dense.step()
            dense.zero_grad()
    return step


def build(config: str):
    """Returns step(ids) for a configuration (``*_rowwise``: row-wise Adagrad, lr 0.05,
    instead of SGD)."""
    import rectables
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    F = len(CRITEO_KAGGLE)
    lengths = torch.ones(F * BATCH, dtype=torch.int64)
    offsets = torch.arange(F * BATCH + 1, dtype=torch.int64)
    grad = torch.randn(BATCH, F * DIM, generator=torch.Generator().manual_seed(0))
    rowwise = config.endswith("_rowwise")
    config = config.removesuffix("_rowwise")
    opt = rectables.SparseOptimizer("rowwise_adagrad", lr=0.05) if rowwise else rectables.SparseOptimizer("sgd", lr=0.01)

    if config in ("full", "hash_1m") or config.startswith(("qr_", "unified_")):
        if config.startswith("qr_"):
            import math

            tables = [rectables.create_table(
                "compositional", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=n, partition="qr",
                moduli=[4 if config == "qr_m4" else math.ceil(math.sqrt(n))],
                combine="add" if config.endswith("_add") else "mult")
                for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)]
        elif config.startswith("unified_k1_"):  # one chunk of D per feature: one lookup per id
            from rectables.presets import parse_fraction

            buckets = int(parse_fraction(config.split("_")[2]) * sum(CRITEO_KAGGLE))
            tables = [rectables.create_table("unified", name="u", embedding_dim=DIM, feature_names=CRITEO_FEATURES,
                                             buckets_per_table=buckets, num_chunks=1)]
        elif config.startswith("unified_"):
            from rectables.presets import parse_fraction
            from rectables.registry import table_class

            frac = parse_fraction(config.split("_")[1])
            tables = table_class("unified").for_budget_all(DIM, CRITEO_FEATURES, CRITEO_KAGGLE, frac)
        elif config == "full":
            tables = [rectables.create_table("full", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=n)
                      for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)]
        else:
            tables = [rectables.create_table("hash", name="shared", embedding_dim=DIM, feature_names=CRITEO_FEATURES, num_buckets=1 << 20)]
        return collection_step(rectables.EmbeddingBagCollection(tables, opt))

    if config == "tbe_qr_sqrt":  # raw TBE in QR's layout (m = ceil(sqrt(n))), ids remapped ahead: the kernel's floor
        import math

        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

        m = torch.tensor([math.ceil(math.sqrt(n)) for n in CRITEO_KAGGLE]).unsqueeze(1)
        sizes = [int(x) for x in m.view(-1)] + [-(-n // int(x)) for n, x in zip(CRITEO_KAGGLE, m.view(-1))]
        tbe = SplitTableBatchedEmbeddingBagsCodegen(  # lanes: all remainders, then all quotients
            [(r, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for r in sizes],
            optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.01, bounds_check_mode=BoundsCheckMode.NONE)
        for w in tbe.split_embedding_weights():
            w.detach().uniform_(-0.01, 0.01)
        off2 = torch.arange(2 * F * BATCH + 1, dtype=torch.int64)
        grad2 = torch.randn(BATCH, 2 * F * DIM, generator=torch.Generator().manual_seed(0))
        remapped: dict[int, torch.Tensor] = {}

        def step(ids):
            key = ids.data_ptr()
            if key not in remapped:
                v = ids.view(F, BATCH)
                remapped[key] = torch.cat([(v % m).reshape(-1), torch.div(v, m, rounding_mode="floor").reshape(-1)])
            tbe(remapped[key], off2).backward(grad2)
        return step

    if config == "tbe":
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(n, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in CRITEO_KAGGLE],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD if rowwise else EmbOptimType.EXACT_SGD,
            learning_rate=opt.lr, eps=opt.eps, bounds_check_mode=BoundsCheckMode.NONE)
        for w in tbe.split_embedding_weights():
            w.detach().uniform_(-0.01, 0.01)

        def step(ids):
            tbe(ids, offsets).backward(grad)
        return step

    if config == "nn_embeddingbag":
        bags = torch.nn.ModuleList(torch.nn.EmbeddingBag(n, DIM, mode="sum", sparse=True) for n in CRITEO_KAGGLE)
        sgd = torch.optim.SGD(bags.parameters(), lr=0.01)
        per = torch.arange(BATCH)

        def step(ids):
            sgd.zero_grad()
            out = torch.cat([b(x, per) for b, x in zip(bags, ids.split(BATCH))], 1)
            out.backward(grad)
            sgd.step()
        return step

    if config == "torchrec_ebc":
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f])
            for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)])
        sgd = torch.optim.SGD(ebc.parameters(), lr=0.01)

        def step(ids):
            sgd.zero_grad()
            kjt = KeyedJaggedTensor(keys=CRITEO_FEATURES, values=ids, lengths=lengths, offsets=offsets, stride=BATCH)
            ebc(kjt).values().backward(grad)
            sgd.step()
        return step
    raise ValueError(config)


def run(config: str) -> dict:
    torch.manual_seed(0)
    batches = zipf_batches(8)
    step = build(config)
    steps = 3 if config == "torchrec_ebc" else STEPS  # dense updates of 2.2 GB: seconds each
    for i in range(WARMUP):
        step(batches[i % len(batches)])
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    dt = (time.perf_counter() - t0) / steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"config": config, "ms_per_step": dt * 1e3, "samples_per_s": BATCH / dt,
            "lookups_per_s": BATCH * len(CRITEO_KAGGLE) / dt, "peak_rss_bytes": rss}


AB_CONFIGS = ["tbe", "tbe_qr_sqrt", "full", "hash_1m", "qr_m4", "qr_sqrt", "qr_sqrt_add", "unified_1/4", "unified_1/64",
              "unified_k1_1/4", "tbe_rowwise", "full_rowwise"]


def run_ab(rounds: int = 8, steps: int = 10) -> dict:
    """The fused configurations in one process, interleaved round by round, so that
    memory placement and machine noise hit each alike; median ms/step per config."""
    torch.manual_seed(0)
    batches = zipf_batches(8)
    fns = {c: build(c) for c in AB_CONFIGS}
    for f in fns.values():
        for i in range(WARMUP):
            f(batches[i])
    times: dict[str, list[float]] = {c: [] for c in fns}
    names = list(fns)
    for r in range(rounds):
        for c in names[r % len(names):] + names[: r % len(names)]:  # who runs first rotates
            f = fns[c]
            t0 = time.perf_counter()
            for i in range(steps):
                f(batches[i % len(batches)])
            times[c].append((time.perf_counter() - t0) / steps * 1e3)
    return {c: statistics.median(v) for c, v in times.items()}


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(run_ab() if sys.argv[1] == "ab" else run(sys.argv[1])))
