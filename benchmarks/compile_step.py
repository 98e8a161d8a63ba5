"""Embedding train step, eager vs torch.compile'd (inductor), interleaved in one process.

Criteo Kaggle cardinalities, 26 features with one id each, Zipf(1.05) ids, dim 16,
batch 4096, SGD on the tables, a fixed upstream gradient.  Under torch.compile the
lookup is one opaque op (rectables/compiled.py): the compiled step runs the same lookup
and fused update as the eager one, plus the op's bookkeeping.

    python benchmarks/compile_step.py METHOD  ->  one JSON line (METHOD: full | hash)
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from embedding_step import BATCH, DIM, zipf_batches
from rectables.presets import CRITEO_FEATURES, CRITEO_KAGGLE

ROUNDS, STEPS, WARMUP = 10, 3, 3


def collection(method: str):
    import rectables

    torch.manual_seed(0)
    if method == "full":
        tables = [rectables.create_table("full", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=n)
                  for f, n in zip(CRITEO_FEATURES, CRITEO_KAGGLE)]
    else:
        tables = [rectables.create_table("hash", name="shared", embedding_dim=DIM, feature_names=CRITEO_FEATURES,
                                         num_buckets=1 << 20)]
    return rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("sgd", lr=0.01))


def run(method: str) -> dict:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    F = len(CRITEO_KAGGLE)
    lengths, offsets = torch.ones(F * BATCH, dtype=torch.int64), torch.arange(F * BATCH + 1, dtype=torch.int64)
    grad = torch.randn(BATCH, F * DIM, generator=torch.Generator().manual_seed(0))
    batches = zipf_batches(4)
    eager, compiled = collection(method), collection(method)
    lookup = {"eager": lambda kjt: eager(kjt).values(), "compiled": torch.compile(lambda kjt: compiled(kjt).values())}

    def step(name: str, ids: torch.Tensor) -> None:
        kjt = KeyedJaggedTensor(keys=CRITEO_FEATURES, values=ids, lengths=lengths, offsets=offsets, stride=BATCH)
        lookup[name](kjt).backward(grad)

    t0 = time.perf_counter()
    step("compiled", batches[0])
    compile_s = time.perf_counter() - t0
    step("eager", batches[0])
    for name in lookup:
        for i in range(WARMUP):
            step(name, batches[i % len(batches)])
    times: dict[str, list[float]] = {n: [] for n in lookup}
    for r in range(ROUNDS):
        for name in (["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]):
            t0 = time.perf_counter()
            for i in range(STEPS):
                step(name, batches[i % len(batches)])
            times[name].append((time.perf_counter() - t0) / STEPS * 1e3)
    same = all(torch.equal(a.tbe.weights_host, b.tbe.weights_host)
               for a, b in zip(eager.storages.values(), compiled.storages.values()))
    return {"method": method, "eager_ms": statistics.median(times["eager"]),
            "compiled_ms": statistics.median(times["compiled"]),
            "ratio": statistics.median(e / c for e, c in zip(times["eager"], times["compiled"])),
            "first_compiled_step_s": compile_s, "same_rows": same}


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(run(sys.argv[1])))
