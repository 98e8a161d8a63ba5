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
import embedding_step  # noqa: E402

LABELS = {
    "tbe": "raw fbgemm TBE (EXACT_SGD)",
    "full": "rectables `full`",
    "hash_1m": "rectables `hash`, one shared table of 2^20 rows",
    "nn_embeddingbag": "26 x nn.EmbeddingBag(sparse=True) + SGD",
    "torchrec_ebc": "torchrec EmbeddingBagCollection + torch.optim.SGD",
}


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


def embedding_section(rounds: int) -> str:
    res = measure(HERE / "embedding_step.py", embedding_step.CONFIGS, rounds)
    base = {k: res[k]["samples_per_s"] for k in ("tbe", "torchrec_ebc", "nn_embeddingbag", "full")}
    lines = [
        "## Embedding train step (issue: foundation)",
        "",
        f"Criteo Kaggle cardinalities (26 features, 33,762,577 ids), one id per feature, Zipf(1.05) ids, "
        f"dim {embedding_step.DIM}, batch {embedding_step.BATCH}; forward + backward + SGD update with a fixed "
        f"upstream gradient; median of {rounds} interleaved rounds, each configuration in its own process.",
        "",
        "| configuration | ms/step | samples/s | lookups/s | peak RSS | vs raw TBE | vs torchrec EBC | vs nn.EmbeddingBag | vs rectables full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in embedding_step.CONFIGS:
        r = res[c]
        s = r["samples_per_s"]
        lines.append(
            f"| {LABELS[c]} | {r['ms_per_step']:.1f} | {s:,.0f} | {r['lookups_per_s']:,.0f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {s / base['tbe']:.2f}x | {s / base['torchrec_ebc']:.1f}x | "
            f"{s / base['nn_embeddingbag']:.2f}x | {s / base['full']:.2f}x |"
        )
    spread = ", ".join(f"{c}: {'/'.join(f'{x:.0f}' for x in res[c]['spread'])}" for c in embedding_step.CONFIGS)
    lines += ["", f"Per-round ms/step (noise): {spread}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. The machine is shared and noisy (absolute "
        "times move up to 2x between runs); compare the ratios, which come from the same run.",
        "",
    ]
    Path(args.out).write_text("\n".join(head) + embedding_section(args.rounds))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
