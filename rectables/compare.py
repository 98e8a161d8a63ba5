"""Train every method at every byte budget on the same data and seeds; write a table and a plot."""
from __future__ import annotations

from pathlib import Path

from rectables.experiment import IncompatibleMethod, run_training


def compare(spec: dict, methods: list[str], budgets: list[float], out_dir: str | Path, overwrite: bool = False) -> list[dict]:
    """A run per method and budget in ``out_dir``; a run already there with the same
    settings is resumed (a finished one is only scored again), unless ``overwrite``."""
    from rectables.registry import table_class

    for m in methods:
        table_class(m)  # an unknown name fails before any training
    out = Path(out_dir)
    rows = []
    for method in methods:
        for budget in [1.0] if method == "full" else budgets:
            try:
                s = run_training({**spec, "method": method, "budget": budget}, out / f"{method}_{budget:g}",
                                 resume=not overwrite, overwrite=overwrite)
            except IncompatibleMethod as e:  # a row that says why, not an aborted comparison
                rows.append({"method": method, "budget": budget, "skipped": str(e)})
                print(f"{method} @ {budget:g}: skipped: {e}", flush=True)
                continue
            tables = s["memory"]["tables"].values()
            rows.append({
                "method": method, "budget": budget,
                "rows": sum(t["rows"] for t in tables),
                "bytes": sum(t["total"] for t in tables),  # weights, optimizer state, buffers (a map)
                "auc": s["test"]["auc"], "logloss": s["test"]["logloss"],
                "samples_per_s": s["history"][-1]["samples_per_s"],
            })
            print(f"{method} @ {budget:g}: test AUC {rows[-1]['auc']:.4f}", flush=True)
    write_report(rows, out)
    return rows


def write_report(rows: list[dict], out: Path) -> None:
    skipped = [r for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    full = next((r for r in rows if r["method"] == "full"), None)  # without it: "-", not a wrong baseline
    lines = ["| method | budget | rows | table bytes | vs full | test AUC | ΔAUC | logloss | train samples/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{full['bytes'] / r['bytes']:.1f}x" if full else "-"
        delta = f"{r['auc'] - full['auc']:+.4f}" if full else "-"
        lines.append(
            f"| {r['method']} | {r['budget']:g} | {r['rows']:,} | {r['bytes'] / 1e6:,.1f} MB | "
            f"{ratio} | {r['auc']:.4f} | {delta} | {r['logloss']:.4f} | {r['samples_per_s']:,.0f} |"
        )
    lines += [f"| {r['method']} | {r['budget']:g} | skipped: {r['skipped']} | | | | | | |" for r in skipped]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["bytes"], r["auc"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("table bytes (weights + optimizer state + buffers)")
    ax.set_ylabel("test AUC")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    print(f"plot: {out / 'pareto.png'}")
