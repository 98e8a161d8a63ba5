"""Real data with the default settings: do the embeddings help, and on later rows?

1. The Criteo sample (`../shared/data/criteo`): `compare` with the CLI defaults (auto
   batch size, one epoch), 3 seeds, DLRM and DeepFM; the base rate and a logistic
   regression on the 13 dense features are rows of the same table.
2. Later rows: the sample's rows are in Kaggle Id order (Id = time order).  Rows with Id
   >= 40M (the last fifth of the training period; 1,076 rows) are held out; the rest are
   preprocessed and trained on with defaults, and the held-out rows are scored with
   `rectables eval` like a later day would be.  Batch sizes 4096 (the old default), 256
   and auto, 3 seeds; the dense-only regression is fitted on the same training split.
3. Avazu (`../shared/data/avazu`, `preprocess --schema avazu`): `compare` with defaults.
"""
from __future__ import annotations

import gzip
import json
import statistics
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO = SHARED / "criteo" / "criteo_dac_train_sample.tsv.gz"
PROVENANCE = SHARED / "criteo" / "criteo_dac_train_sample.provenance.tsv.gz"
AVAZU = SHARED / "avazu" / "avazu_train_sample6k.csv.gz"
LATER_ID = 40_000_000
SEEDS = "0,1,2"
OUT = Path("runs/bench-real")
HEADING = "## Real data with default settings"


def _run(cli: list[str], *args: str) -> str:
    return subprocess.run(cli + list(args), check=True, capture_output=True, text=True).stdout


def _prep(cli, src: Path, out: Path, *extra: str) -> Path:
    if not (out / "meta.json").exists():
        _run(cli, "preprocess", str(src), "--out", str(out), *extra)
    return out


def split_by_time(dst: Path) -> tuple[Path, Path]:
    """(earlier.tsv, later.tsv): the sample's rows by Kaggle Id (unknown Ids: earlier)."""
    dst.mkdir(parents=True, exist_ok=True)
    early, late = dst / "earlier.tsv", dst / "later.tsv"
    if not late.exists():
        with gzip.open(CRITEO, "rt") as rows, gzip.open(PROVENANCE, "rt") as prov:
            next(prov)  # header
            with open(early, "w") as fe, open(late, "w") as fl:
                for row, p in zip(rows, prov):
                    kid = p.split("\t")[1]
                    (fl if kid != "NA" and int(kid) >= LATER_ID else fe).write(row)
    return early, late


def dense_regression_on(prep: Path, later: Path) -> dict:
    """The dense-only logistic regression fitted on ``prep``'s training split, scored on ``later``."""
    import torch

    from data.criteo import dense_transform, read_criteo
    from rectables.baselines import _split, fit_dense_regression
    from rectables.metrics import StreamingMetrics

    predict = fit_dense_regression(*_split(str(prep), "train"))
    m = StreamingMetrics()
    for ch in read_criteo(later):
        m.update(predict(torch.from_numpy(dense_transform(ch.dense))), torch.from_numpy(ch.labels))
    return m.result()


def later_rows(cli) -> list[str]:
    from rectables.experiment import score_file

    early, late = split_by_time(OUT / "time")
    prep = _prep(cli, early, OUT / "time" / "prep")
    lr = dense_regression_on(prep, late)
    n = sum(1 for _ in open(late))
    lines = [f"Later rows: trained on the {sum(1 for _ in open(early)):,} earlier rows (Kaggle Id < 40M, or unknown), "
             f"scored on the {n:,} rows with Id >= 40M. Dense-only logistic regression: AUC {lr['auc']:.4f}, "
             f"logloss {lr['logloss']:.4f}.", "",
             "| model | batch size | AUC on later rows | logloss | vs dense-only regression |", "|---|---|---:|---:|---:|"]
    for model in ("dlrm", "deepfm"):
        for batch in ("4096", "256", "auto"):
            aucs, lls = [], []
            for seed in SEEDS.split(","):
                run = OUT / "time" / f"{model}_{batch}_seed{seed}"
                _run(cli, "train", "--data", str(prep), "--model", model, "--batch-size", batch, "--seed", seed,
                     "--quiet", "--overwrite", "--run", str(run))
                r = score_file(run, late)  # what `rectables eval --data later.tsv` prints
                aucs.append(r["auc"])
                lls.append(r["logloss"])
            shown = batch if batch != "auto" else f"auto ({json.loads((run / 'config.json').read_text())['train']['batch_size']})"
            lines.append(f"| {model} | {shown} | {statistics.mean(aucs):.4f} ± {statistics.stdev(aucs):.4f} | "
                         f"{statistics.mean(lls):.4f} | {statistics.mean(aucs) - lr['auc']:+.4f} |")
    return lines


def section(cli: list[str]) -> str:
    if not CRITEO.exists():
        return f"{HEADING}\n\n../shared/data is not present: section skipped.\n"
    prep = _prep(cli, CRITEO, OUT / "criteo" / "prep")
    lines = [HEADING, "", "Everything below runs with the CLI defaults (batch size auto, one epoch, DLRM 64-16 / 64-1, "
             "row-wise Adagrad) and 3 seeds (mean ± std); `compare` puts the base rate and the dense-only "
             "regression in the same table.", ""]
    for model in ("dlrm", "deepfm"):
        out = OUT / "criteo" / f"compare-{model}"
        _run(cli, "compare", "--data", str(prep), "--model", model, "--methods", "full,hash,unified,compositional",
             "--budgets", "1/4", "--seeds", SEEDS, "--quiet", "--out", str(out))
        lines += [f"Criteo sample (8,971 rows, vocab ids, min count 2, 80/10/10 split), {model}:", "",
                  (out / "comparison.md").read_text(), ""]
    lines += later_rows(cli) + [""]
    if AVAZU.exists():
        av = _prep(cli, AVAZU, OUT / "avazu" / "prep", "--schema", "avazu")
        out = OUT / "avazu" / "compare"
        _run(cli, "compare", "--data", str(av), "--methods", "full,hash,multihash,unified,compositional",
             "--budgets", "1/4", "--seeds", SEEDS, "--quiet", "--out", str(out))
        lines += ["Avazu sample (6,000 rows of 4 hours, `--schema avazu`: 21 categorical columns plus hour of day "
                  "and weekday, no dense features, vocab ids with min count 2, 80/10/10 split), DLRM:", "",
                  (out / "comparison.md").read_text()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(section([sys.executable, "-m", "rectables.cli"]))
