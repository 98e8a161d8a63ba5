"""Dynamic tables (issue: collisionless dynamic tables), all in one process, interleaved.

``remap``: ids/s of the id -> row remap in train mode, rectables ``dynamic`` (LFU, admission
at 2 occurrences; all tables in one call, as the collection makes it, on 2 threads) against torchrec's ``MCHManagedCollisionModule`` (LFU, eviction every
10 batches), one module per feature with capacity min(cardinality, 1M) at the Criteo
Kaggle cardinalities; 26 x 4096 Zipf(1.05) ids per batch as raw 62-bit values.  Both read
the same stream: ``WARM`` batches first, then ``MEASURE`` batches interleaved batch by batch
(the median batch, and the mean over all of them with the batches that evict).

``step``: the whole embedding train step (remap + forward + backward + fused row-wise
Adagrad) of ``dynamic`` against ``hash`` with the same rows per feature, once ``warm``
batches of remaps alone have filled the dynamic tables.

Prints one JSON line.  Usage: python benchmarks/dynamic_remap.py [remap|step] [warm] [measure]
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rectables
from rectables import hashing
from rectables.methods.dynamic import DynamicTable
from rectables.presets import CRITEO_FEATURES, CRITEO_KAGGLE

BATCH, CAP, DIM, EVICT_EVERY = 4096, 1 << 20, 16, 10
CAPS = [min(n, CAP) for n in CRITEO_KAGGLE]


class ZipfStream:
    """Batches of raw ids [F * B], feature-major; rank r of feature f (Zipf(1.05) over its
    cardinality) becomes the 62-bit id mix(r ^ salt_f) >> 2."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.cdfs = []
        for n in CRITEO_KAGGLE:
            w = np.arange(1, n + 1, dtype=np.float64) ** -1.05
            self.cdfs.append(np.cumsum(w) / w.sum())
        self.salts = torch.tensor([hashing.salt_key(seed, f) for f in range(len(CRITEO_KAGGLE))])

    def batch(self) -> torch.Tensor:
        ranks = [np.searchsorted(c, self.rng.random(BATCH)) for c in self.cdfs]
        r = torch.from_numpy(np.stack(ranks)).to(torch.int64)  # [F, B]
        y = r ^ self.salts[:, None]
        hashing._mix64_(y)
        return ((y >> 2) & ((1 << 62) - 1)).reshape(-1)


def dynamic_tables() -> list[DynamicTable]:
    return [DynamicTable(f"t_{f}", DIM, [f], cap, min_count=2, eviction="lfu", evict_every=EVICT_EVERY, seed=i)
            for i, (f, cap) in enumerate(zip(CRITEO_FEATURES, CAPS))]


def bench_remap(warm: int, measure: int) -> dict:
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
    from torchrec.sparse.jagged_tensor import JaggedTensor

    stream = ZipfStream()
    tables = dynamic_tables()
    ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("rowwise_adagrad", lr=0.01))
    mch = [MCHManagedCollisionModule(cap, torch.device("cpu"), LFU_EvictionPolicy(), EVICT_EVERY) for cap in CAPS]
    ones = torch.ones(BATCH, dtype=torch.int64)

    def ours(ids):  # as the collection calls it: all tables of the class at once
        DynamicTable.remap_many(tables, list(ids.split(BATCH)), [[BATCH]] * len(tables))

    def theirs(ids):
        for m, f, x in zip(mch, CRITEO_FEATURES, ids.split(BATCH)):
            m({f: JaggedTensor(values=x, lengths=ones)})

    times = {"dynamic": [], "mch": []}
    for i in range(warm + measure):
        ids = stream.batch()
        for name, fn in (("dynamic", ours), ("mch", theirs)) if i % 2 else (("mch", theirs), ("dynamic", ours)):
            t0 = time.perf_counter()
            fn(ids)
            if i >= warm:
                times[name].append(time.perf_counter() - t0)
        if i % 500 == 0:
            print(f"batch {i}: occupancy {[round(t.stats()['occupancy'], 2) for t in tables[2:4]]}", file=sys.stderr)
    n = BATCH * len(CAPS)
    stats = [t.stats() for t in tables]
    del ebc
    return {
        "ids_per_batch": n, "warm": warm, "measure": measure,
        **{f"{k}_ids_per_s": n / statistics.median(v) for k, v in times.items()},
        "ratio": statistics.median(times["mch"]) / statistics.median(times["dynamic"]),
        # over all batches: the batches that evict (theirs every 10, ours when a table is full) count too
        **{f"{k}_mean_ids_per_s": n / statistics.mean(v) for k, v in times.items()},
        "mean_ratio": statistics.mean(times["mch"]) / statistics.mean(times["dynamic"]),
        "occupancy_big": [round(s["occupancy"], 3) for s, c in zip(stats, CRITEO_KAGGLE) if c > CAP],
        "evicted": sum(s["evicted"] for s in stats), "admitted": sum(s["admitted"] for s in stats),
        "rejected": sum(s["rejected"] for s in stats), "collisions": sum(s["collisions"] for s in stats),
    }


def bench_step(warm: int, measure: int) -> dict:
    stream = ZipfStream(seed=1)
    opt = rectables.SparseOptimizer("rowwise_adagrad", lr=0.01)
    dyn = rectables.EmbeddingBagCollection(dynamic_tables(), opt)
    hsh = rectables.EmbeddingBagCollection(
        [rectables.create_table("hash", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_buckets=cap + 1)
         for f, cap in zip(CRITEO_FEATURES, CAPS)], opt)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    lengths = torch.ones(BATCH * len(CAPS), dtype=torch.int64)
    grad = torch.randn(BATCH, DIM * len(CAPS))
    for _ in range(warm):  # fill the tables (remap only: the map and its evictions, no lookups)
        DynamicTable.remap_many(dyn.tables, list(stream.batch().split(BATCH)), [[BATCH]] * len(CAPS))
    times = {"dynamic": [], "hash": []}
    warm = 20  # full steps before timing
    for i in range(warm + measure):
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=CRITEO_FEATURES, values=stream.batch(), lengths=lengths)
        for name, m in (("dynamic", dyn), ("hash", hsh)) if i % 2 else (("hash", hsh), ("dynamic", dyn)):
            t0 = time.perf_counter()
            m(kjt).values().backward(grad)
            if i >= warm:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    occ = [round(t.stats()["occupancy"], 3) for t, c in zip(dyn.tables, CRITEO_KAGGLE) if c > CAP]
    return {"measure": measure, "dynamic_ms": med["dynamic"], "hash_ms": med["hash"],
            "ratio": med["dynamic"] / med["hash"], "occupancy_big": occ,
            "evicted": sum(t.stats()["evicted"] for t in dyn.tables)}


CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "criteo_dac_train_sample.tsv.gz"


def section(cli: list[str], warm: int = 3000, measure: int = 300) -> str:
    """The BENCHMARKS.md section: remap and step (each in its own process), then accuracy at
    equal bytes on the real Criteo sample (``cli``: how to call the rectables command line)."""
    def run(*args):
        out = subprocess.run([sys.executable, str(Path(__file__)), *args], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    r, st = run("remap", str(warm), str(measure)), run("step", str(warm), "100")
    lines = [
        "## Dynamic tables (issue: collisionless dynamic tables)",
        "",
        f"Remap in train mode, one module per feature with capacity min(cardinality, 2^20) at the Criteo Kaggle "
        f"cardinalities, {r['ids_per_batch']:,} Zipf(1.05) raw 62-bit ids per batch (26 x 4096), the same stream "
        f"for both; {r['warm']} batches first, then {r['measure']} batches interleaved batch by batch (the median "
        f"batch, and all batches: total ids over total time, the batches that evict included). "
        f"rectables `dynamic`: count-min admission at 2 occurrences, LFU eviction when full (1% of the rows at a "
        f"time), every evicted row re-initialised and its optimizer state zeroed; the 26 tables remapped as the "
        f"collection does it, in one native call spread over 2 threads (torch's thread count). torchrec "
        f"`MCHManagedCollisionModule`: LFU, eviction every {10} batches, no row reset.",
        "",
        "| remap | ids/s, median batch | vs torchrec MCH | ids/s, all batches | vs torchrec MCH |",
        "|---|---:|---:|---:|---:|",
        f"| rectables `dynamic` | {r['dynamic_ids_per_s'] / 1e6:.1f}M | **{r['ratio']:.2f}x** | "
        f"{r['dynamic_mean_ids_per_s'] / 1e6:.1f}M | **{r['mean_ratio']:.2f}x** |",
        f"| torchrec `MCHManagedCollisionModule` | {r['mch_ids_per_s'] / 1e6:.1f}M | 1.00x | "
        f"{r['mch_mean_ids_per_s'] / 1e6:.1f}M | 1.00x |",
        "",
        f"State after the run: occupancy of the five tables of > 2^20 ids {r['occupancy_big']}; "
        f"{r['admitted']:,} keys admitted, {r['rejected']:,} rejected (key and step), {r['evicted']:,} evicted, "
        f"{r['collisions']} collisions.",
        "",
        f"Embedding train step (remap + lookup + backward + fused row-wise Adagrad, dim 16, batch 4096) of "
        f"`dynamic` against `hash` with the same rows per feature, after {warm} batches of remaps alone filled "
        f"the dynamic tables (occupancy of the five largest {st['occupancy_big']}, evicting all along: "
        f"{st['evicted']:,} rows evicted), {st['measure']} interleaved steps: `dynamic` {st['dynamic_ms']:.1f} ms, "
        f"`hash` {st['hash_ms']:.1f} ms, **{st['ratio']:.2f}x** the time of `hash` (target <= 1.3x).",
        "",
    ]
    if CRITEO_SAMPLE.exists():
        prep = Path("runs/bench-criteo/prep")
        if not (prep / "meta.json").exists():
            subprocess.run(cli + ["preprocess", str(CRITEO_SAMPLE), "--out", str(prep), "--min-count", "2"],
                           check=True, capture_output=True)
        out = Path("runs/bench-criteo/compare")
        subprocess.run(cli + ["compare", "--data", str(prep), "--methods", "full,hash,unified,compositional,dynamic",
                              "--budgets", "1/4,1/16", "--epochs", "4", "--batch-size", "256", "--seeds", "0,1,2",
                              "--patience", "2", "--dense-arch",
                              "32,16", "--over-arch", "32,1", "--quiet", "--out", str(out)],
                       check=True, capture_output=True)
        lines += [
            "Accuracy at equal bytes on the real Criteo sample (`../shared/data/criteo`, 8,971 rows, vocab ids with "
            "min count 2, 80/10/10 split, DLRM 32-16 / 32-1, batch 256, up to 4 epochs (patience 2), 3 seeds (mean ± std); "
            "table bytes include "
            "`dynamic`'s map). The generated-data comparison is in the accuracy section below.",
            "",
            (out / "comparison.md").read_text(),
        ]
    return "\n".join(lines)



if __name__ == "__main__":
    torch.set_num_threads(2)
    what = sys.argv[1] if len(sys.argv) > 1 else "remap"
    warm = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    measure = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    print(json.dumps((bench_remap if what == "remap" else bench_step)(warm, measure)))
