"""``make bench``: run every benchmark and write BENCHMARKS.md.

Each configuration runs in its own process (honest peak RSS), rounds are interleaved
so that machine noise hits every configuration alike, and every figure is reported as
a ratio against baselines measured in the same run (median over rounds).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dynamic_remap  # noqa: E402
import e2e_deepfm  # noqa: E402
import e2e_dlrm  # noqa: E402
import real_data  # noqa: E402
import recsys  # noqa: E402
import embedding_step  # noqa: E402
import optembed_bench  # noqa: E402

LABELS = {
    "tbe": "raw fbgemm TBE (EXACT_SGD)",
    "tbe_rowwise": "raw fbgemm TBE (EXACT_ROWWISE_ADAGRAD)",
    "full_rowwise": "rectables `full`, row-wise Adagrad",
    "tbe_qr_sqrt": "raw fbgemm TBE in QR's layout (2 lanes per id, m = ceil(sqrt(n)), ids remapped ahead)",
    "full": "rectables `full`",
    "hash_1m": "rectables `hash`, one shared table of 2^20 rows",
    "qr_m4": "rectables `compositional` QR m = 4, mult",
    "qr_sqrt": "rectables `compositional` QR m = ceil(sqrt(n)), mult",
    "qr_sqrt_add": "rectables `compositional` QR m = ceil(sqrt(n)), add",
    "unified_k1_1/4": "rectables `unified` at 1/4, one chunk of 16 per feature",
    "unified_1/4": "rectables `unified` at 1/4 of the bytes",
    "unified_1/64": "rectables `unified` at 1/64 of the bytes",
    "nn_embeddingbag": "26 x nn.EmbeddingBag(sparse=True) + SGD",
    "torchrec_ebc": "torchrec EmbeddingBagCollection + torch.optim.SGD",
    "torchrec_dlrm": "torchrec DLRM + FusedEmbeddingBagCollection",
    "full": "rectables `full`",
    "hash_1/16": "rectables `hash` at 1/16 of the bytes",
    "multihash_1/16": "rectables `multihash` at 1/16 of the bytes",
    "unified_1/16": "rectables `unified` (1 shared table, 2 chunks) at 1/16",
    "compositional_1/16": "rectables `compositional` (QR, m = 16, mult) at 1/16",
    "deepctr_deepfm": "deepctr-torch 0.3.0 DeepFM (dense tables, Adam)",
}
DEEPFM_LABELS = {"full": "rectables DeepFM, `full` (fused TBE, sparse row-wise Adam)"}


def measure(script: Path, configs: list[str], rounds: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(rounds):
        for c in configs:
            out = subprocess.run([sys.executable, str(script), c], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[c].append(res)
            print(f"round {r + 1}/{rounds} {c}: {res['samples_per_s']:,.0f} samples/s", file=sys.stderr)
    med = {}
    for c, rs in runs.items():
        ms = statistics.median(x["ms_per_step"] for x in rs)
        med[c] = {**rs[0], "ms_per_step": ms, "samples_per_s": rs[0]["samples_per_s"] * rs[0]["ms_per_step"] / ms,
                  "lookups_per_s": rs[0]["lookups_per_s"] * rs[0]["ms_per_step"] / ms,
                  "peak_rss_bytes": max(x["peak_rss_bytes"] for x in rs), "spread": [x["ms_per_step"] for x in rs]}
    return med


def table(res: dict, configs: list[str], baselines: dict[str, str]) -> list[str]:
    head = "| configuration | ms/step | samples/s | lookups/s | peak RSS | " + " | ".join(f"vs {v}" for v in baselines.values()) + " |"
    lines = [head, "|---|" + "---:|" * (4 + len(baselines))]
    for c in configs:
        r, s = res[c], res[c]["samples_per_s"]
        ratios = " | ".join(f"{s / res[b]['samples_per_s']:.2f}x" for b in baselines)
        lines.append(f"| {LABELS[c]} | {r['ms_per_step']:.1f} | {s:,.0f} | {r['lookups_per_s']:,.0f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {ratios} |")
    spread = ", ".join(f"{c}: {'/'.join(f'{x:.0f}' for x in res[c]['spread'])}" for c in configs)
    return lines + ["", f"Per-round ms/step (noise): {spread}.", ""]


def embedding_section(rounds: int) -> str:
    res = measure(HERE / "embedding_step.py", embedding_step.CONFIGS, rounds)
    out = subprocess.run([sys.executable, str(HERE / "embedding_step.py"), "ab"], capture_output=True, text=True, check=True)
    ab = json.loads(out.stdout.strip().splitlines()[-1])
    ab_lines = [
        "Fused configurations, all in one process, interleaved over 8 rounds (the fairest speed ratio: "
        "separate processes place their 2.2 GB differently and move 10% on their own):",
        "",
        "| configuration | median ms/step | vs raw TBE | vs rectables full |",
        "|---|---:|---:|---:|",
        *[f"| {LABELS[c]} | {ab[c]:.1f} | {ab['tbe'] / ab[c]:.2f}x | {ab['full'] / ab[c]:.2f}x |"
          for c in embedding_step.AB_CONFIGS if not c.endswith("_rowwise")],
        "",
        f"With row-wise Adagrad (lr 0.05, the training loop's default) in the same run: raw fbgemm TBE "
        f"{ab['tbe_rowwise']:.1f} ms, rectables `full` {ab['full_rowwise']:.1f} ms, "
        f"**{ab['tbe_rowwise'] / ab['full_rowwise']:.2f}x** the speed of raw TBE. rectables applies SGD, Adagrad and "
        f"row-wise Adagrad in its own kernel (`rectables/_rowupdate.c`) on fbgemm's rows and state; fbgemm's CPU "
        f"backward spends about 1 us per distinct row for row-wise Adagrad.",
        "",
    ]
    return "\n".join([
        "## Embedding train step (issue: foundation)",
        "",
        f"Criteo Kaggle cardinalities (26 features, 33,762,577 ids), one id per feature, Zipf(1.05) ids, "
        f"dim {embedding_step.DIM}, batch {embedding_step.BATCH}; forward + backward + SGD update with a fixed "
        f"upstream gradient; median of {rounds} interleaved rounds, each configuration in its own process.",
        "",
        *table(res, embedding_step.CONFIGS, {"tbe": "raw TBE", "torchrec_ebc": "torchrec EBC",
                                              "nn_embeddingbag": "nn.EmbeddingBag", "full": "rectables full"}),
        *ab_lines,
    ])


CLI = [sys.executable, "-m", "rectables.cli"]


def generated(tsv: Path, rows: int, min_count: int) -> Path:
    """``rows`` generated rows at the Criteo Kaggle cardinalities (seed 0) in ``tsv``,
    preprocessed with vocab ids into ``tsv``'s folder / prep; each made if missing."""
    prep = tsv.parent / "prep"
    if not tsv.exists():
        subprocess.run(CLI + ["synth", "--rows", str(rows), "--out", str(tsv), "--seed", "0"], check=True)
    if not (prep / "meta.json").exists():
        subprocess.run(CLI + ["preprocess", str(tsv), "--out", str(prep), "--min-count", str(min_count)], check=True)
    return prep


def dlrm_ab(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "e2e_dlrm.py"), "ab", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ab_line(ab: dict, what: str) -> str:
    return (f"{what}, both DLRMs in one process, interleaved over {len(ab['rounds'])} rounds of {ab['steps']} steps: "
            f"torchrec {ab['torchrec_dlrm']:.1f} ms/step, rectables `full` {ab['full']:.1f} ms/step (medians); "
            f"median of the per-round ratios **{ab['ratio']:.2f}x** torchrec. Rounds: "
            + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in ab["rounds"]) + " ms (torchrec/rectables).")


def dlrm_section(rounds: int) -> str:
    res = measure(HERE / "e2e_dlrm.py", e2e_dlrm.CONFIGS, rounds)
    ab, data = dlrm_ab(), generated(Path("runs/bench-e2e/d.tsv"), 200_000, min_count=1)
    ab_e2e = dlrm_ab(str(data))
    return "\n".join([
        "## DLRM train step (issue: data, training loop, models)",
        "",
        f"Criteo Kaggle cardinalities, dim 16, batch 4096, dense arch {e2e_dlrm.DENSE_ARCH}, over arch "
        f"{e2e_dlrm.OVER_ARCH}; row-wise Adagrad on the tables, fused torch Adam on the dense layers (both sides); "
        f"model + update on in-memory Zipf batches, each configuration in its own process; median of {rounds} rounds.",
        "",
        *table(res, e2e_dlrm.CONFIGS, {"torchrec_dlrm": "torchrec DLRM", "full": "rectables full"}),
        ab_line(ab, "Model + update on the same in-memory batches"),
        "",
        ab_line(ab_e2e, f"End to end (loader + model + update): {json.loads((data / 'meta.json').read_text())['rows']:,} "
                        f"generated rows at the Kaggle cardinalities (`{data}`, vocab ids), each model pulling shuffled "
                        "batches from its own `CriteoBatches` with prefetch inside the timed steps"),
        "",
    ])


def deepfm_section() -> str:
    res = measure(HERE / "e2e_deepfm.py", e2e_deepfm.CONFIGS, 1)
    labels = {**LABELS, **DEEPFM_LABELS}
    d, f = res["deepctr_deepfm"], res["full"]
    return "\n".join([
        "## DeepFM train step against deepctr-torch (issue: data, training loop, models)",
        "",
        f"Criteo Kaggle cardinalities, dim 16, batch 4096, DNN {e2e_deepfm.HIDDEN}, L2 off on both; deepctr-torch "
        "runs its own fit() step body (dense embedding gradients, Adam over every parameter); one round "
        "(deepctr takes seconds per step).",
        "",
        "| configuration | ms/step | samples/s | peak RSS |",
        "|---|---:|---:|---:|",
        *[f"| {labels[c]} | {res[c]['ms_per_step']:.1f} | {res[c]['samples_per_s']:,.0f} | "
          f"{res[c]['peak_rss_bytes'] / 1e9:.2f} GB |" for c in e2e_deepfm.CONFIGS],
        "",
        f"rectables: **{f['samples_per_s'] / d['samples_per_s']:.0f}x** the samples/s at "
        f"{f['peak_rss_bytes'] / d['peak_rss_bytes']:.2f} of the peak memory (our Adam keeps a full first moment; "
        "row-wise Adagrad would need about half).",
        "",
    ])


def accuracy_section(data_dir: Path = Path("runs/demo"), out: Path = Path("runs/bench-compare")) -> str:
    """Every method at 1/4 and 1/16 of `full`'s bytes on the demo's generated data (made if missing)."""
    tsv = data_dir / "criteo_synth.tsv"
    prep = generated(tsv, 1_000_000, min_count=2)
    subprocess.run(CLI + ["compare", "--data", str(prep), "--budgets", "1/4,1/16", "--epochs", "2", "--quiet",
                          "--out", str(out)], check=True, capture_output=True)
    facts = Path(str(tsv) + ".json")
    synth_meta = json.loads(facts.read_text()) if facts.exists() else {}
    bayes = f" (Bayes AUC of the planted model: {synth_meta['bayes_auc']:.3f})" if "bayes_auc" in synth_meta else ""
    return "\n".join([
        "## Accuracy at 1/4 and 1/16 of the bytes on generated Criteo-format data (issue: unified and compositional)",
        "",
        "`make demo`'s job: 1M generated rows (seed 0), vocab ids with min count 2, 80/10/10 split, DLRM "
        f"(dim 16), 2 epochs, row-wise Adagrad, same seed for every method{bayes}. Plot: `{out}/pareto.png`.",
        "",
        (out / "comparison.md").read_text(),
    ])


def ingest_section(rows: int = 1_000_000) -> str:
    import tempfile

    import pandas as pd
    from data.criteo import read_criteo
    from data.loader import CriteoBatches
    from data.preprocess import preprocess
    from data.synth import synth

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "d.tsv"
        synth(rows, path, seed=1)
        t = time.perf_counter()
        for _ in read_criteo(path):
            pass
        ours = rows / (time.perf_counter() - t)
        t = time.perf_counter()
        pd.read_csv(path, sep="\t", header=None)
        plain = rows / (time.perf_counter() - t)
        from pyarrow import csv

        t = time.perf_counter()
        csv.read_csv(path, read_options=csv.ReadOptions(autogenerate_column_names=True),
                     parse_options=csv.ParseOptions(delimiter="\t"))
        arrow = rows / (time.perf_counter() - t)
        preprocess(path, Path(d) / "p")
        import torchrec.sparse.jagged_tensor  # noqa: F401  (imported once by a run, not per batch)

        loader = CriteoBatches(Path(d) / "p", "train", 4096, shuffle=True)
        t, n = time.perf_counter(), 0
        for b in loader:
            n += len(b.labels)
        load = n / (time.perf_counter() - t)
    return "\n".join([
        "## Ingest and loader (issue: data, training loop, models)",
        "",
        f"{rows:,} generated rows, plain TSV, 2 cores. Target: >= 1M rows/s parse. `read_criteo` parses blocks "
        "with a small C extension (`data/_criteo_parse.c`, one part of each block per core, straight into the "
        "arrays) and re-parses a block with the strict pandas path only when something in it is malformed.",
        "",
        "| step | rows/s | vs plain pandas.read_csv |",
        "|---|---:|---:|",
        f"| `data.criteo.read_criteo` (parse + validate + hex ids) | {ours:,.0f} | {ours / plain:.2f}x |",
        f"| `pandas.read_csv(sep='\\t', header=None)` (no validation, ids left as strings) | {plain:,.0f} | 1.00x |",
        f"| `pyarrow.csv.read_csv` whole file, types inferred (no validation, ids left as strings) | {arrow:,.0f} | {arrow / plain:.2f}x |",
        f"| `CriteoBatches` memmap -> KJT batches (shuffled, batch 4096) | {load:,.0f} | {load / plain:.2f}x |",
        "",
    ])


PUBLISHED = {  # TensorFlow Recommenders' Unified Embedding tutorial, mean of 5 runs: (AUC, logloss)
    ("full", "full"): (0.797, 0.380), ("hash", "published"): (0.743, 0.407), ("unified", "published"): (0.790, 0.380),
}


def movielens_section() -> str:
    out = subprocess.run([sys.executable, str(HERE / "movielens_ue.py")], capture_output=True, text=True, check=True)
    runs = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    lines = [
        "## Unified Embedding protocol on MovieLens-100k (issue: unified and compositional)",
        "",
        "label = rating >= 3; seeded shuffle, 80,000 train / 20,000 test; movie, user, gender, zip, occupation, "
        "bucketized age; concatenated embeddings (dim 16) -> Dense 128 -> Dense 64 -> logit; Adam lr 0.01 "
        "(tables: our sparse row-wise Adam), 5 epochs, batch 8192; mean ± std over 5 seeds. `published` = the "
        "tutorial's bytes (23,040 floats: hashing 1,440 rows x 16, split 240 per feature; UE 2 tables x 1,440 "
        "buckets x dim 8, 2 chunks per feature); `quarter` = 1/4 of `full`. The tutorial's hashing baseline "
        "silently dropped one feature; ours uses all six.",
        "",
        "| method | setting | table floats | test AUC | logloss | published AUC / logloss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (m, s), rs in groups.items():
        auc = [r["auc"] for r in rs]
        ll = [r["logloss"] for r in rs]
        pub = PUBLISHED.get((m, s))
        lines.append(f"| {m} | {s} | {rs[0]['floats']:,} | {statistics.mean(auc):.3f} ± {statistics.stdev(auc):.3f} | "
                     f"{statistics.mean(ll):.3f} ± {statistics.stdev(ll):.3f} | "
                     f"{f'{pub[0]:.3f} / {pub[1]:.3f}' if pub else '-'} |")
    return "\n".join(lines + [""])


def compile_section() -> str:
    rows = []
    for method in ("full", "hash"):
        out = subprocess.run([sys.executable, str(HERE / "compile_step.py"), method], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return "\n".join([
        "## torch.compile (issue: torchrec drop-in)",
        "",
        "Embedding train step (forward + backward + fused SGD update) at the Criteo Kaggle cardinalities, dim 16, "
        "batch 4096: the collection eager and under `torch.compile` (inductor), both in one process, interleaved "
        "over 10 rounds of 3 steps; medians and the median of the per-round ratios. Under compile the lookup is one "
        "custom op with no graph break (`rectables/compiled.py`); both sides end on identical rows.",
        "",
        "| method | eager ms/step | compiled ms/step | eager/compiled | first compiled step s | same rows |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {r['method']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio']:.2f}x | "
          f"{r['first_compiled_step_s']:.1f} | {r['same_rows']} |" for r in rows],
        "",
        "The compiled step is a little slower: compile cannot fuse into fbgemm's kernels, and the op keeps the "
        "lookup's autograd graph for its backward.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--rounds", type=int, default=3)
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. The machine is shared and noisy (absolute "
        "times move up to 2x between runs); compare the ratios, which come from the same run.",
        "",
    ]
    sections = ["embedding", "dlrm", "deepfm", "ingest", "movielens", "accuracy", "compile", "dynamic", "real", "din",
                "optembed", "graph"]
    if set(sections) != set(HEADINGS):  # a section without its heading would be dropped from the file
        raise RuntimeError(f"sections without a heading: {sorted(set(sections) ^ set(HEADINGS))}")
    default = [x for x in sections if x != "graph"]  # the graph runs take ~2 h: make bench-graph
    p.add_argument("--only", default="", help="comma list of sections: " + ",".join(sections))
    args = p.parse_args()
    wanted = args.only.split(",") if args.only else default
    make = {"embedding": lambda: embedding_section(args.rounds), "dlrm": lambda: dlrm_section(args.rounds),
            "deepfm": deepfm_section, "ingest": ingest_section, "movielens": movielens_section,
            "accuracy": accuracy_section, "compile": compile_section,
            "dynamic": lambda: dynamic_remap.section(CLI), "real": lambda: real_data.section(CLI),
            "din": recsys.din_section, "optembed": lambda: optembed_bench.section(CLI),
            "graph": lambda: recsys.graph_section()}
    fresh = {w: make[w]() for w in wanted}
    out = Path(args.out)
    if out.exists():  # replace the sections run, keep the rest (make bench keeps make bench-graph's)
        old = _split_sections(out.read_text())
        keys = [k for k in sections if k in old or k in fresh]
        body = [fresh.get(k) or old[k] for k in keys]
    else:
        body = [fresh[w] for w in wanted]
    out.write_text("\n".join(head) + "\n".join(body))
    print(f"wrote {args.out}", file=sys.stderr)


HEADINGS = {"embedding": "## Embedding train step", "dlrm": "## DLRM train step", "deepfm": "## DeepFM train step",
            "ingest": "## Ingest and loader", "movielens": "## Unified Embedding protocol", "accuracy": "## Accuracy at",
            "compile": "## torch.compile", "dynamic": "## Dynamic tables", "real": "## Real data with default settings",
            "din": "## DIN", "optembed": "## OptEmbed", "graph": "## NGCF and LightGCN"}


def _split_sections(text: str) -> dict[str, str]:
    """The sections of a BENCHMARKS.md by key (text from its heading to the next one)."""
    parts = text.split("\n## ")
    found = {}
    for part in parts[1:]:
        chunk = "## " + part
        for key, heading in HEADINGS.items():
            if chunk.startswith(heading):
                found[key] = chunk.rstrip("\n") + "\n"
    return found


if __name__ == "__main__":
    main()
