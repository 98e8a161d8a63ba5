"""Train every method at every byte budget and seed on the same data; write
``comparison.md``, ``comparison.csv``, ``comparison.json`` and ``pareto.png``.

Rows are (method, budget) with the mean ± standard deviation over seeds; the baselines
(base rate, logistic regression on the dense features) come first, so a reader sees
whether the embeddings help at all.  Table bytes are everything the tables hold:
weights, optimizer state and buffers (a dynamic table's id map).
"""
from __future__ import annotations

import csv
import json
import statistics
from fractions import Fraction
from pathlib import Path

from rectables.experiment import IncompatibleMethod, run_training

SPEED_NOTE = ("train samples/s: runs one after another on a shared machine (noisy, about ±15%), "
              "not interleaved; BENCHMARKS.md has the interleaved speed ratios")


def budget_label(b: float) -> str:
    """0.0625 -> '1/16', 1.0 -> '1', 0.3 -> '0.3'."""
    f = Fraction(b).limit_denominator(1024)
    return str(f) if abs(float(f) - b) < 1e-9 else f"{b:g}"


def compare(spec: dict, methods: list[str], budgets: list[float], out_dir: str | Path, overwrite: bool = False,
            seeds: list[int] | None = None, baselines: bool = True) -> list[dict]:
    """A run per method, budget and seed in ``out_dir`` (``<method>_<budget>_seed<k>``); a
    run already there with the same settings is resumed (a finished one only scored
    again), unless ``overwrite``.  Returns the report's rows."""
    from rectables.graph import GRAPH_MODELS, run_graph
    from rectables.optembed_run import run_optembed
    from rectables.registry import table_class
    from rectables.sequential import SEQUENCE_MODELS, run_din

    sequence = spec.get("model") in SEQUENCE_MODELS  # DIN: its own data and runner, no CTR baselines
    graph = spec.get("model") in GRAPH_MODELS  # NGCF, LightGCN: ranking metrics in the AUC / logloss columns
    train = run_graph if graph else run_din if sequence else run_training
    metrics = (f"Recall@{spec.get('k') or 20}", f"NDCG@{spec.get('k') or 20}") if graph else ("AUC", "logloss")
    for m in methods:
        table_class(m)  # an unknown name fails before any training
    seeds = seeds if seeds else [spec.get("seed", 0) if graph else spec.get("train", {}).get("seed", 0)]
    out = Path(out_dir)
    runs = []
    for method in methods:
        for budget in [1.0] if table_class(method).no_budget else budgets:
            for seed in seeds:
                run_spec = {**{k: v for k, v in spec.items() if k != "optembed"}, "method": method, "budget": budget}
                run_spec.update({"seed": seed} if graph else {"train": {**spec.get("train", {}), "seed": seed}})
                name = f"{method}_{budget:g}_seed{seed}"
                runner = train
                if method == "optembed":  # the whole pipeline; its export's bytes and test metrics
                    if graph or sequence:
                        runs.append({"method": method, "budget": budget, "seed": seed,
                                     "skipped": "the OptEmbed pipeline runs on CTR data (dlrm, deepfm)"})
                        continue
                    runner = run_optembed
                    run_spec.update(spec.get("optembed") or {})
                try:
                    s = runner(run_spec, out / name, resume=not overwrite, overwrite=overwrite)
                except IncompatibleMethod as e:  # a row that says why, not an aborted comparison
                    runs.append({"method": method, "budget": budget, "seed": seed, "skipped": str(e)})
                    print(f"{name}: skipped: {e}", flush=True)
                    continue
                runs.append(_record_graph(method, budget, seed, s) if graph else _record(method, budget, seed, s))
                print(f"{name}: test {metrics[0]} {runs[-1]['auc']:.4f}", flush=True)
    rows = aggregate(runs)
    base = []
    if baselines and not sequence and not graph:
        from rectables.baselines import baselines as compute

        base = compute(spec["data"])
    write_report(rows, out, base=base, runs=runs, title=_title(spec, seeds), metrics=metrics)
    return rows


def _common(method: str, budget: float, seed: int, s: dict) -> dict:
    """A run's row fields that do not depend on the model family: who it is and its bytes."""
    tables = s["memory"]["tables"].values()
    return {"method": method, "budget": budget, "seed": seed, "settings": s.get("settings", {}),
            "rows": sum(t["rows"] for t in tables),
            **{k: sum(t[k] for t in tables) for k in ("weights", "optimizer", "buffers")},
            "bytes": sum(t["total"] for t in tables)}


def _record(method: str, budget: float, seed: int, s: dict) -> dict:
    best = next(h for h in s["history"] if h["epoch"] == s["best_epoch"])
    return {
        **_common(method, budget, seed, s),
        "auc": s["test"]["auc"], "logloss": s["test"]["logloss"], "gauc": s["test"].get("gauc"),
        "best_epoch": s["best_epoch"],
        "val_auc": best["val_auc"], "samples_per_s": statistics.median(h["samples_per_s"] for h in s["history"]),
        "wall_s": sum(s["stages"].values()) if "stages" in s else sum(h.get("seconds", 0.0) for h in s["history"]),
    }


def _record_graph(method: str, budget: float, seed: int, s: dict) -> dict:
    """A graph run as a row: its last test Recall@k and NDCG@k in the AUC and logloss
    slots (the table labels them), training interactions per second."""
    k, last = s["config"]["k"], s["last"]
    return {
        **_common(method, budget, seed, s),
        "auc": last[f"recall@{k}"], "logloss": last[f"ndcg@{k}"], "gauc": None,
        "best_epoch": last["epoch"], "val_auc": float("nan"),
        "samples_per_s": s["interactions"] / s["seconds_per_epoch"], "wall_s": sum(h["train_s"] for h in s["history"]),
    }


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (method, budget): means (and std of AUC and logloss) over its seeds;
    within a method, rows by bytes; skipped combinations keep their reason."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    rows = []
    for (method, budget), rs in groups.items():
        done = [r for r in rs if "skipped" not in r]
        if not done:
            rows.append({"method": method, "budget": budget, "skipped": rs[0]["skipped"]})
            continue
        row = {"method": method, "budget": budget, "settings": _merged([r["settings"] for r in done]),
               "seeds": [r["seed"] for r in done]}
        for k in ("rows", "weights", "optimizer", "buffers", "bytes"):  # optembed's size varies with the seed
            row[k] = round(statistics.mean(r[k] for r in done))
        for k in ("auc", "logloss", "val_auc", "best_epoch", "samples_per_s", "wall_s"):
            row[k] = statistics.mean(r[k] for r in done)
        for k in ("auc", "logloss"):
            row[f"{k}_std"] = statistics.stdev(r[k] for r in done) if len(done) > 1 else 0.0
        gauc = [r["gauc"] for r in done if r.get("gauc") is not None]
        row["gauc"] = statistics.mean(gauc) if gauc else None
        rows.append(row)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    return sorted(rows, key=lambda r: (order[r["method"]], r.get("bytes", float("inf"))))


def _merged(settings: list[dict]) -> dict:
    """One row's settings over its seeds: a value all seeds share as it is; a number that
    differs by seed (optembed's rows_pruned, mean_dim) as the mean, like the row's other
    fields; anything else that differs as the list of the seeds' values."""
    out = {}
    for k in dict.fromkeys(k for s in settings for k in s):
        vs = [s.get(k) for s in settings]
        if all(v == vs[0] for v in vs):
            out[k] = vs[0]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs):
            out[k] = round(statistics.mean(vs), 3)
        else:
            out[k] = vs
    return out


def _title(spec: dict, seeds: list[int]) -> str:
    from data.preprocess import open_dataset
    from rectables.sequential import SEQUENCE_MODELS

    from rectables.graph import GRAPH_MODELS

    if spec.get("model") in SEQUENCE_MODELS or spec.get("model") in GRAPH_MODELS:
        return f"{Path(str(spec['data'])).name}: {spec['model']}, dim {spec.get('dim') or 'default'}, {len(seeds)} seed(s)"
    meta = open_dataset(spec["data"])
    facts = Path(str(meta.get("source", "")) + ".json")
    bayes = ""
    if facts.is_file():
        bayes_auc = json.loads(facts.read_text()).get("bayes_auc")
        bayes = f", Bayes AUC {bayes_auc:.3f}" if bayes_auc else ""
    return (f"{Path(meta['source']).name}: {meta['rows']:,} rows ({meta['mode']} ids), {spec.get('model', 'dlrm')}, "
            f"dim {spec.get('dim', 16)}, {len(seeds)} seed(s){bayes}")


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:,.2f} MB"


def _settings(d: dict) -> str:
    """``num_chunks=[2, 2, ..., 2]`` (one per feature) reads ``num_chunks=2 x26``."""
    def show(v):
        return f"{v[0]} x{len(v)}" if isinstance(v, list) and len(v) > 3 and len(set(map(str, v))) == 1 else v

    return ", ".join(f"{k}={show(v)}" for k, v in d.items())


def write_report(rows: list[dict], out: Path, base: list[dict] | None = None, runs: list[dict] | None = None,
                 title: str = "", metrics: tuple[str, str] = ("AUC", "logloss")) -> None:
    """``metrics``: the names of the two test metrics (graph models: Recall@k, NDCG@k)."""
    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if "skipped" not in r]
    full = next((r for r in done if r["method"] == "full"), None)  # without it: "-", not a wrong baseline
    lines = [f"{title}" if title else "", "",
             "| method | budget | settings | rows | weights | optimizer | buffers | table bytes | vs full | "
             f"test {metrics[0]} | Δ{metrics[0]} | {metrics[1]} | GAUC | best epoch | val AUC | train samples/s | train s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in base or []:
        delta = f"{b['auc'] - full['auc']:+.4f}" if full else "-"
        lines.append(f"| *{b['method']}* | - | no tables | - | - | - | - | - | - | {b['auc']:.4f} | {delta} | "
                     f"{b['logloss']:.4f} | - | - | - | - | - |")
    for r in done:
        n = len(r["seeds"])
        ratio = f"{full['bytes'] / r['bytes']:.1f}x" if full else "-"
        delta = f"{r['auc'] - full['auc']:+.4f}" if full else "-"
        lines.append(
            f"| {r['method']} | {'learned' if r['method'] == 'optembed' else budget_label(r['budget'])} | {_settings(r['settings'])} | {r['rows']:,} | "
            f"{_mb(r['weights'])} | {_mb(r['optimizer'])} | {_mb(r['buffers'])} | {_mb(r['bytes'])} | {ratio} | "
            f"{_pm(r['auc'], r['auc_std'], n)} | {delta} | {_pm(r['logloss'], r['logloss_std'], n)} | "
            f"{'-' if r.get('gauc') is None else format(r['gauc'], '.4f')} | {r['best_epoch']:g} | "
            f"{'-' if r['val_auc'] != r['val_auc'] else format(r['val_auc'], '.4f')} | {r['samples_per_s']:,.0f} | {r['wall_s']:.0f} |")
    lines += [f"| {r['method']} | {budget_label(r['budget'])} | skipped: {r['skipped']} |" + " |" * 14
              for r in rows if "skipped" in r]
    lines += ["", f"Table bytes = weights + optimizer state + buffers. {SPEED_NOTE}."]
    if any(r["method"] == "optembed" for r in done):
        lines.append("optembed picks its own size (learned row pruning and a dim search): its row is the exported "
                     "compact tables after retraining (bytes, test metrics; train samples/s of the retraining, "
                     "train s of all four stages).")
    if metrics[0] != "AUC":
        lines.append(f"{metrics[0]} and {metrics[1]}: the test split after the last epoch (\"best epoch\"; the data "
                     "have no validation split, so nothing is selected); samples/s counts training interactions.")
    text = "\n".join(lines).strip("\n") + "\n"
    (out / "comparison.md").write_text(text)
    fields = ["method", "budget", "settings", "seeds", "rows", "weights", "optimizer", "buffers", "bytes", "auc",
              "auc_std", "logloss", "logloss_std", "gauc", "best_epoch", "val_auc", "samples_per_s", "wall_s", "skipped"]
    with open(out / "comparison.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in [{**b, "budget": ""} for b in base or []] + rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items() if k in fields})
    (out / "comparison.json").write_text(json.dumps({"title": title, "baselines": base or [], "rows": rows,
                                                     "runs": runs or []}, indent=1))
    _plot(done, base or [], out / "pareto.png", title, metrics[0])
    print(text)
    print(f"plot: {out / 'pareto.png'}; tables: comparison.md, comparison.csv, comparison.json in {out}")


def _plot(rows: list[dict], base: list[dict], path: Path, title: str, metric: str = "AUC") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = next((r for r in rows if r["method"] == "full"), None)
    if full:
        ax.axhline(full["auc"], color="black", lw=1, ls="-", label=f"full ({_mb(full['bytes'])})")
    for b in base:
        if "logistic" in b["method"]:
            ax.axhline(b["auc"], color="grey", lw=1, ls=":", label="logistic regression, dense only")
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["bytes"])
        xs, ys = [r["bytes"] / 1e6 for r in pts], [r["auc"] for r in pts]
        ax.errorbar(xs, ys, yerr=[r["auc_std"] for r in pts], fmt="o-", capsize=3, label=m)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(budget_label(r["budget"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("table bytes, MB (weights + optimizer state + buffers; log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
