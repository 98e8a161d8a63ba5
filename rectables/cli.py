"""``rectables`` command line: ``rectables memory`` (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import sys

from rectables.presets import CRITEO_FEATURES, PRESETS, parse_fraction


def build_criteo_collection(method: str, dim: int, fraction: float, cardinalities: list[int], optimizer, device="cpu"):
    """One table per Criteo feature, each sized for ``fraction`` of its full bytes."""
    from rectables.collection import EmbeddingBagCollection
    from rectables.registry import table_class

    cls = table_class(method)
    names = CRITEO_FEATURES[: len(cardinalities)] if len(cardinalities) <= 26 else [f"C{i+1}" for i in range(len(cardinalities))]
    tables = [cls.for_budget(f"t_{f}", dim, [f], n, fraction, seed=i) for i, (f, n) in enumerate(zip(names, cardinalities))]
    return EmbeddingBagCollection(tables, optimizer, device)


def _gb(b: int) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def cmd_memory(args: argparse.Namespace) -> int:
    from rectables.memory import memory_report
    from rectables.optim import SparseOptimizer
    from rectables.registry import list_tables

    cards = PRESETS[args.preset]
    opt = SparseOptimizer(args.optimizer)
    methods = args.methods.split(",") if args.methods else list_tables()
    budgets = [parse_fraction(b) for b in args.budgets.split(",")]
    print(f"{args.preset}: {len(cards)} features, {sum(cards):,} ids, dim {args.dim}, optimizer {opt.name}")
    print(f"| method | budget | rows | weights | optimizer | total | vs full |")
    print(f"|---|---|---:|---:|---:|---:|---:|")
    full_total = None
    for method in methods:
        for frac in [1.0] if method == "full" else budgets:
            ebc = build_criteo_collection(method, args.dim, frac, cards, opt, device="meta")
            rep = memory_report(ebc)
            rows = sum(t["rows"] for t in rep["tables"].values())
            w = sum(t["weights"] for t in rep["tables"].values())
            o = sum(t["optimizer"] for t in rep["tables"].values())
            full_total = full_total or (rep["total"] if method == "full" else None)
            ratio = f"{full_total / rep['total']:.1f}x" if full_total else "-"
            print(f"| {method} | {frac:g} | {rows:,} | {_gb(w)} | {_gb(o)} | {_gb(rep['total'])} | {ratio} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rectables", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory", help="bytes of every method at a preset's cardinalities (meta device)")
    m.add_argument("--preset", choices=sorted(PRESETS), default="criteo-kaggle")
    m.add_argument("--dim", type=int, default=16)
    m.add_argument("--optimizer", default="rowwise_adagrad")
    m.add_argument("--methods", default="", help="comma list; default every registered method")
    m.add_argument("--budgets", default="1/4,1/16", help="fractions of the full bytes, e.g. 1/4,1/16")
    m.set_defaults(func=cmd_memory)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
