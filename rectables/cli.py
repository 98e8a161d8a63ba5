"""rectables command line: synth | preprocess | train | eval | compare | optembed | memory."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rectables.presets import PRESETS, parse_fraction
from rectables.specs import check_family, din_spec, graph_spec, optembed_args, optembed_settings, spec_of


def build_criteo_collection(method: str, dim: int, fraction: float, cardinalities: list[int], optimizer, device="cpu"):
    """The method's tables for the Criteo features at ``fraction`` of the full table bytes
    (weights + optimizer state + buffers)."""
    from rectables.embedding_modules import EmbeddingBagCollection
    from rectables.registry import table_class

    from rectables.sizing import tables_for_budget

    names = [f"C{i + 1}" for i in range(len(cardinalities))]
    tables = tables_for_budget(table_class(method), dim, names, cardinalities, fraction, optimizer)
    return EmbeddingBagCollection(tables, optimizer, device)


def _gb(b: int) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def cmd_memory(args: argparse.Namespace) -> int:
    from rectables.compare import budget_label
    from rectables.memory import memory_report
    from rectables.optim import SparseOptimizer
    from rectables.registry import list_tables, table_class

    cards = PRESETS[args.preset]
    opt = SparseOptimizer(args.optimizer)
    methods = args.methods.split(",") if args.methods else list_tables()
    budgets = [parse_fraction(b) for b in args.budgets.split(",")]
    print(f"{args.preset}: {len(cards)} features, {sum(cards):,} ids, dim {args.dim}, optimizer {opt.name}")
    print("| method | budget | rows | weights | optimizer | buffers | total | vs full |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    full_total = None
    for method in methods:
        for frac in [1.0] if table_class(method).no_budget else budgets:  # optembed: its supernet
            ebc = build_criteo_collection(method, args.dim, frac, cards, opt, device="meta")
            rep = memory_report(ebc)
            rows = sum(t["rows"] for t in rep["tables"].values())
            w = sum(t["weights"] for t in rep["tables"].values())
            o = sum(t["optimizer"] for t in rep["tables"].values())
            b = sum(t["buffers"] for t in rep["tables"].values())  # seeds, salts, a dynamic table's map
            full_total = full_total or (rep["total"] if method == "full" else None)
            ratio = f"{full_total / rep['total']:.1f}x" if full_total else "-"
            print(f"| {method} | {budget_label(frac)} | {rows:,} | {_gb(w)} | {_gb(o)} | {_gb(b)} | "
                  f"{_gb(rep['total'])} | {ratio} |")
    return 0


def cmd_synth(args) -> int:
    from data.synth import synth
    from rectables.runs import write_json

    facts = synth(args.rows, args.out, seed=args.seed, scale=args.scale)
    write_json(Path(str(args.out) + ".json"), facts)  # rows, seed, Bayes AUC of the planted model
    print(f"wrote {facts['rows']:,} rows to {facts['path']}: positive rate {facts['positive_rate']:.3f}, "
          f"Bayes AUC {facts['bayes_auc']:.4f}")
    return 0


def cmd_preprocess(args) -> int:
    from data.preprocess import preprocess

    meta = preprocess(args.src, args.out, mode=args.mode, min_count=args.min_count, seed=args.seed,
                      skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite, schema=args.schema)
    print(f"{meta['rows']:,} rows ({meta['skipped_lines']} bad lines skipped), mode {meta['mode']}, "
          f"splits {meta['splits']}, {sum(meta['cardinalities']):,} ids -> {args.out}")
    return 0


def cmd_train(args) -> int:
    from rectables.experiment import run_training

    family = check_family(args)
    if family == "sequence":
        from rectables.sequential import run_din

        s = run_din(din_spec(args), args.run, resume=args.resume, overwrite=args.overwrite)
        print(f"best val AUC {s['best_val_auc']:.4f} (epoch {s['best_epoch']}); test AUC {s['test']['auc']:.4f}, "
              f"GAUC {s['test']['gauc']:.4f}, logloss {s['test']['logloss']:.4f} -> {args.run}")
        return 0
    if family == "graph":
        from rectables.graph import run_graph

        s = run_graph(graph_spec(args), args.run, resume=args.resume, overwrite=args.overwrite)
        last = s["last"]
        k = s["config"]["k"]
        print(f"epoch {last['epoch']}: recall@{k} {last[f'recall@{k}']:.4f}, ndcg@{k} {last[f'ndcg@{k}']:.4f}, "
              f"{s['seconds_per_epoch']:.0f} s per epoch -> {args.run}")
        return 0
    s = run_training(spec_of(args), args.run, resume=args.resume, overwrite=args.overwrite)
    if args.method == "optembed":
        print("trained OptEmbed's supernet only (all rows, thresholds learned); `rectables optembed` runs the "
              "supernet, the dim search, the retraining and the export of compact tables")
    print(f"best val AUC {s['best_val_auc']:.4f} (epoch {s['best_epoch']}, chosen by {s['selected_by']}); test AUC {s['test']['auc']:.4f}, logloss {s['test']['logloss']:.4f} -> {args.run}")
    return 0


def cmd_eval(args) -> int:
    from rectables.experiment import score_file

    r = score_file(args.run, args.data, predictions=args.predictions)
    if r["labelled"]:
        print(f"{args.data}: AUC {r['auc']:.4f}, logloss {r['logloss']:.4f} over {r['n']:,} rows")
    else:
        print(f"{args.data}: {r['n']:,} unlabelled rows: no AUC or logloss")
    if "oov_share" in r:
        shares = sorted(r["oov_share"].items(), key=lambda kv: -kv[1])
        print("values the vocabulary does not know (they read the OOV row): "
              + ", ".join(f"{k} {v:.1%}" for k, v in shares[:8]) + (", ..." if len(shares) > 8 else ""))
    if args.predictions:
        print(f"wrote {r['n']:,} click probabilities to {args.predictions}")
    return 0


def cmd_optembed(args) -> int:
    from rectables.optembed_run import run_optembed

    if check_family(args) != "ctr":
        raise ValueError(f"the OptEmbed pipeline trains CTR models (dlrm, deepfm), not --model {args.model}")
    s = run_optembed({**spec_of(args), "method": "optembed", **optembed_settings(args)}, args.run,
                     resume=args.resume, overwrite=args.overwrite, until=args.until)
    if args.until != "export":
        print(f"stopped after stage {args.until} -> {args.run}")
        return 0
    print(f"exported: {s['memory']['total'] / 1e6:,.2f} MB of tables; {s['rows_pruned']:.0%} of the rows pruned "
          f"({min(s['pruned']):.0%}-{max(s['pruned']):.0%} per feature), dims {min(s['dims'])}-{max(s['dims'])}; "
          f"test AUC {s['test']['auc']:.4f}, logloss {s['test']['logloss']:.4f} -> {args.run}/export")
    return 0


def cmd_compare(args) -> int:
    from rectables.compare import compare
    from rectables.registry import list_tables

    methods = args.methods.split(",") if args.methods else list_tables()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    given = optembed_settings(args)
    if (given["table_options"] or given["search"]) and "optembed" not in methods:
        raise ValueError("OptEmbed flags (--alpha, --rounds, ...) apply to method optembed, which --methods leaves out")
    compare({**spec_of(args), "optembed": given}, methods, [parse_fraction(b) for b in args.budgets.split(",")], args.out,
            overwrite=args.overwrite, seeds=seeds)
    return 0


def _batch_size(text: str):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return int(text)


def _train_args(p: argparse.ArgumentParser) -> None:
    from rectables.optim import OPTIMIZERS

    from rectables.graph import GRAPH_MODELS

    p.add_argument("--data", required=True,
                   help="preprocessed dataset directory (rectables preprocess); for ngcf/lightgcn a directory with "
                        "train.txt and test.txt in the NGCF format, or 'gowalla' (../shared/data/gowalla); for din "
                        "'movielens' or 'beauty' (or their directories)")
    p.add_argument("--dim", type=int, default=None,
                   help="embedding dim (default: 16; 64 for ngcf/lightgcn); DLRM: the last layer of --dense-arch")
    from rectables.sequential import SEQUENCE_MODELS

    p.add_argument("--model", choices=["dlrm", "deepfm", *GRAPH_MODELS, *SEQUENCE_MODELS], default="dlrm",
                   help="CTR model over the tables; a graph model (implicit feedback, ranking metrics: --data gowalla); "
                        "or DIN on behaviour sequences (--data movielens or beauty)")
    p.add_argument("--dense-arch", default=None,
                   help="DLRM bottom MLP over the dense features, its last layer = --dim (default: 64,DIM; "
                        "DIM on data without dense features)")
    p.add_argument("--over-arch", default=None,
                   help="DLRM top MLP (last = 1); DeepFM: its hidden layers + 1 (default: 64,1)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training split (default: 1; 20 for "
                                                            "ngcf/lightgcn)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a better validation score (default: 1)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="rows per optimizer step; auto: the largest power of two giving an epoch of >= 100 steps, "
                        "within [32, 4096] (4096 for Criteo at scale, 64 for the 9k-row Criteo sample); "
                        "ngcf/lightgcn: 8192")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help="sparse optimizer of the tables, fused into backward (default: rowwise_adagrad; adam for "
                        "ngcf/lightgcn)")
    p.add_argument("--sparse-lr", type=float, default=None,
                   help="learning rate of the tables (default: 0.05 for dlrm, 0.01 for deepfm, ngcf and lightgcn)")
    p.add_argument("--sparse-eps", type=float, default=None,
                   help="epsilon of the sparse optimizer's denominator (default: 1e-8; OptEmbed's supernet: 1e-5)")
    p.add_argument("--dense-lr", type=float, default=1e-3, help="learning rate of the dense layers (Adam)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (default 0: the whole split)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("graph models (ngcf, lightgcn) only")
    g.add_argument("--layers", type=int, default=None, help="propagation layers (default: 3)")
    g.add_argument("--l2", type=float, default=None, help="L2 on the batch's ego embeddings (default: 1e-4)")
    g.add_argument("--message-dropout", type=float, default=None, help="NGCF's message dropout (default: 0.1)")
    g.add_argument("--node-dropout", type=float, default=None, help="share of edges dropped per step (default: 0)")
    g.add_argument("--sampling", choices=["user", "interaction"], default=None,
                   help="BPR triples: user uniform, then one of their items (the papers' code; default), or every "
                        "training interaction once")
    g.add_argument("--lr-decay", type=float, default=None,
                   help="factor on both learning rates after each epoch of --lr-decay-at (a step schedule)")
    g.add_argument("--lr-decay-at", default=None, help="epochs after which --lr-decay applies, e.g. 40,60")
    g.add_argument("--eval-every", type=int, default=None, help="epochs between test evaluations (default: 1)")
    g.add_argument("--k", type=int, default=None, help="cut-off of Recall@k and NDCG@k (default: 20)")
    d = p.add_argument_group("sequence models (din, din-base) only")
    d.add_argument("--activation", choices=["dice", "prelu"], default=None, help="DIN's activation (default: dice)")
    d.add_argument("--softmax", action="store_true", help="normalise DIN's attention weights (the paper does not)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors are one line on stderr (exit 1; 2 for usage) unless --debug."""
    p = _parser()
    args = p.parse_args(argv)
    if args.debug:
        return args.func(args)
    show = warnings.showwarning
    warnings.showwarning = lambda msg, *a, **k: print(f"rectables: warning: {msg}", file=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("rectables: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, not a traceback; --debug shows it
        print(f"rectables: error: {e}" + ("" if str(e) else type(e).__name__), file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show


def _parser() -> argparse.ArgumentParser:
    from rectables.optim import OPTIMIZERS
    from rectables.registry import list_tables

    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    p = argparse.ArgumentParser(prog="rectables", description=__doc__, **fmt)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="generate Criteo-format data with a planted signal", **fmt)
    s.add_argument("--rows", type=int, required=True, help="rows to write")
    s.add_argument("--out", required=True, help="FILE.tsv or FILE.tsv.gz (facts of the planted model: FILE.json)")
    s.add_argument("--seed", type=int, default=0, help="seed of the planted model and the rows")
    s.add_argument("--scale", type=float, default=1.0, help="multiplies the Criteo Kaggle cardinalities")
    s.set_defaults(func=cmd_synth)
    pp = sub.add_parser("preprocess", help="CTR file (Criteo, Avazu, or a declared schema) -> memmapped npy + meta.json", **fmt)
    pp.add_argument("src", help="data file, plain or .gz, in the --schema's format")
    pp.add_argument("--schema", default="criteo",
                    help="column format: criteo (TSV: label, 13 integers, 26 hex ids), avazu (Kaggle CSV with header), "
                         "or a JSON file declaring each column's role (see data/schema.py)")
    pp.add_argument("--out", required=True, help="dataset directory to write (atomically)")
    pp.add_argument("--mode", choices=["vocab", "raw"], default="vocab",
                    help="vocab: ids renumbered [0, n) per feature (rare ones to OOV id 0); raw: the hashed 32-bit values")
    pp.add_argument("--min-count", type=int, default=2,
                    help="vocab mode: values seen fewer times in the training split map to the OOV id (0), whose row "
                         "then learns: 1 leaves the OOV row untrained")
    pp.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    pp.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (counted) instead of failing")
    pp.add_argument("--overwrite", action="store_true", help="replace --out even if it is a directory that is not a dataset")
    pp.set_defaults(func=cmd_preprocess)
    t = sub.add_parser("train", help="train one method on preprocessed data", **fmt)
    _train_args(t)
    t.add_argument("--method", choices=list_tables(), default="full", help="table method")
    t.add_argument("--budget", default="1", help="fraction of full's bytes, e.g. 1/4 (full: 1)")
    t.add_argument("--run", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --run (same settings; more --epochs allowed)")
    t.add_argument("--overwrite", action="store_true", help="start over, removing the run already in --run")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="score a data file with a trained run", **fmt)
    e.add_argument("--run", required=True, help="run directory of a trained run")
    e.add_argument("--data", required=True,
                   help="a file in the run's data format, with labels or without (Criteo: 40 or 39 fields), or the "
                        "run's own preprocessed directory (its test split)")
    e.add_argument("--predictions", default=None, help="write one click probability per input line to this file")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="every method at every budget: comparison.md + pareto.png", **fmt)
    _train_args(c)
    c.add_argument("--methods", default="", help=f"comma list; empty: every registered method {list_tables()}")
    c.add_argument("--budgets", default="1/4,1/16", help="fractions of full's bytes")
    c.add_argument("--seeds", default="", help="comma list of seeds, e.g. 0,1,2: mean ± std per row (empty: --seed)")
    c.add_argument("--out", required=True, help="directory of the runs and the report")
    c.add_argument("--overwrite", action="store_true",
                   help="start every run over (by default a run already in --out with the same settings is resumed)")
    optembed_args(c)
    c.set_defaults(func=cmd_compare)
    o = sub.add_parser("optembed", help="OptEmbed: supernet, dim search, retrain, export of compact tables", **fmt)
    _train_args(o)
    optembed_args(o)
    o.add_argument("--run", required=True, help="run directory (supernet/, search.json, retrain/, export/)")
    o.add_argument("--until", choices=["supernet", "search", "retrain", "export"], default="export",
                   help="last stage to run (a later call with --resume goes on from there)")
    o.add_argument("--resume", action="store_true", help="continue the run in --run, reusing the stages done")
    o.add_argument("--overwrite", action="store_true", help="start over, removing the run already in --run")
    o.set_defaults(func=cmd_optembed)
    m = sub.add_parser("memory", help="bytes of every method at a preset's cardinalities (meta device)", **fmt)
    m.add_argument("--preset", choices=sorted(PRESETS), default="criteo-kaggle", help="known data-set shape")
    m.add_argument("--dim", type=int, default=16, help="embedding dim")
    m.add_argument("--optimizer", choices=list(OPTIMIZERS), default="rowwise_adagrad", help="sparse optimizer (its state counts)")
    m.add_argument("--methods", default="", help="comma list; empty: every registered method")
    m.add_argument("--budgets", default="1/4,1/16", help="fractions of the full bytes, e.g. 1/4,1/16")
    m.set_defaults(func=cmd_memory)
    return p


if __name__ == "__main__":
    sys.exit(main())
