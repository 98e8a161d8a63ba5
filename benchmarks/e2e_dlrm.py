"""DLRM train step (model + fused sparse update + dense Adam) at the Criteo Kaggle
cardinalities, dim 16, batch 4096, dense arch 512-256-16, over arch 512-512-256-1.

    python benchmarks/e2e_dlrm.py CONFIG  ->  one JSON line (one configuration per process)
    python benchmarks/e2e_dlrm.py ab [DATA_DIR]  ->  torchrec vs rectables interleaved in one
        process, on in-memory batches or, given a preprocessed directory, end to end from the loader
"""
from __future__ import annotations

import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from embedding_step import BATCH, DIM, zipf_batches
from rectables.presets import CRITEO_FEATURES, CRITEO_KAGGLE

DENSE_ARCH, OVER_ARCH = [512, 256, DIM], [512, 512, 256, 1]
CONFIGS = ["torchrec_dlrm", "full", "hash_1/16", "multihash_1/16", "unified_1/16", "compositional_1/16"]
WARMUP, STEPS = 4, 10  # the first 3 steps run slow (allocator and page warm-up)


def build(config: str, cards: list[int] = CRITEO_KAGGLE):
    """step(ids [F*B], dense [B, 13], labels [B]) of one configuration, tables of ``cards`` rows."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    F = len(cards)
    lengths = torch.ones(F * BATCH, dtype=torch.int64)
    offsets = torch.arange(F * BATCH + 1, dtype=torch.int64)
    if config == "torchrec_dlrm":
        from torchrec import EmbeddingBagConfig
        from torchrec.models.dlrm import DLRM as TorchrecDLRM
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        ebc = FusedEmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=n, feature_names=[f])
                    for f, n in zip(CRITEO_FEATURES, cards)],
            optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": 0.05}, device=torch.device("cpu"))
        model = TorchrecDLRM(embedding_bag_collection=ebc, dense_in_features=13,
                             dense_arch_layer_sizes=DENSE_ARCH, over_arch_layer_sizes=OVER_ARCH)
        dense_params = [p for n, p in model.named_parameters() if "sparse_arch" not in n]
        call = lambda d, kjt: model(d, kjt).squeeze(1)  # noqa: E731
    else:
        import rectables
        from models.dlrm import DLRM
        from rectables.registry import table_class

        method, _, frac = config.partition("_")
        fraction = eval(frac) if frac else 1.0  # "1/16"
        tables = table_class(method).for_budget_all(DIM, CRITEO_FEATURES, cards, fraction)
        ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("rowwise_adagrad", lr=0.05))
        model = DLRM(ebc, 13, DENSE_ARCH, OVER_ARCH)
        dense_params = rectables.dense_parameters(model)
        call = model
    opt = torch.optim.Adam(dense_params, lr=1e-3, fused=True)  # the same dense optimizer on both sides
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(ids, dense, labels):
        kjt = KeyedJaggedTensor(keys=CRITEO_FEATURES, values=ids, lengths=lengths, offsets=offsets, stride=BATCH)
        loss = loss_fn(call(dense, kjt), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def model_batches(n: int = 4) -> list[tuple]:
    """(ids [F*B], dense [B, 13] as after log1p, labels [B]) for n batches, seeded."""
    torch.manual_seed(0)
    return [(ids, torch.log1p(torch.rand(BATCH, 13) * 100), (torch.rand(BATCH) < 0.25).float())
            for ids in zipf_batches(n)]


def time_steps(config: str, step, batches: list[tuple], warmup: int, steps: int) -> dict:
    """Mean time of ``steps`` train steps after ``warmup`` ones, with samples/s and peak RSS."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    dt = (time.perf_counter() - t0) / steps
    return {"config": config, "ms_per_step": dt * 1e3, "samples_per_s": BATCH / dt,
            "lookups_per_s": BATCH * len(CRITEO_KAGGLE) / dt,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(config: str) -> dict:
    batches = model_batches()
    return time_steps(config, build(config), batches, WARMUP, STEPS)


def loader_batches(data_dir: str):
    """(ids [F*B], dense [B, 13], labels [B]) without end from the train split of a
    preprocessed directory: the library's loader, shuffled, with its background prefetch."""
    from data.loader import CriteoBatches

    loader = CriteoBatches(data_dir, "train", BATCH, shuffle=True, seed=0)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for b in loader:
            if len(b.labels) == BATCH:
                yield b.sparse.values(), b.dense, b.labels


def data_cards(data_dir: str) -> list[int]:
    """The Kaggle cardinalities, grown where the vocabulary (with its OOV row) is larger."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    return [max(k, v) for k, v in zip(CRITEO_KAGGLE, meta["cardinalities"])]


def run_ab(rounds: int = 20, steps: int = 3, data_dir: str | None = None) -> dict:
    """torchrec's DLRM and rectables `full` in one process, interleaved round by round
    (the one that runs first alternates: it measured ~5% slower), so that machine noise
    and memory placement hit both alike; median ms/step of each, and the median of the
    per-round ratios (a slow phase of the machine hits both sides of a round).  With
    ``data_dir`` each model pulls its batches from its own loader inside the timed
    steps (end to end)."""
    configs = ["torchrec_dlrm", "full"]
    if data_dir is None:
        fixed = model_batches()
        sources = {c: itertools.cycle(fixed) for c in configs}
        cards = CRITEO_KAGGLE
    else:
        sources = {c: loader_batches(data_dir) for c in configs}
        cards = data_cards(data_dir)
    steps_fn = {c: build(c, cards) for c in configs}
    for c, f in steps_fn.items():
        for _ in range(WARMUP):
            f(*next(sources[c]))
    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        for c in configs if r % 2 == 0 else configs[::-1]:  # who runs first alternates
            f, src = steps_fn[c], sources[c]
            t0 = time.perf_counter()
            for _ in range(steps):
                f(*next(src))
            times[c].append((time.perf_counter() - t0) / steps * 1e3)
    med = {c: statistics.median(v) for c, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["torchrec_dlrm"], times["full"]))
    return {**med, "ratio": ratio, "steps": steps,
            "rounds": list(zip(times["torchrec_dlrm"], times["full"]))}


if __name__ == "__main__":
    torch.set_num_threads(2)
    # the models fit the 4 repeated in-memory batches within ~40 steps; the dense values that
    # then go denormal made every later step 5-8x slower on both sides alike (measured)
    torch.set_flush_denormal(True)
    if sys.argv[1] == "ab":
        print(json.dumps(run_ab(data_dir=sys.argv[2] if len(sys.argv) > 2 else None)))
    else:
        print(json.dumps(run(sys.argv[1])))
