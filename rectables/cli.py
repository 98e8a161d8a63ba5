"""rectables command line: synth | preprocess | train | eval | compare | optembed | memory."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rectables.presets import PRESETS, parse_fraction


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


CTR_DEFAULTS = {"dim": 16, "epochs": 1, "optimizer": "rowwise_adagrad", "over_arch": "64,1", "patience": 1,
                "max_steps": 0}
#: flags that only some model families take (ctr: dlrm, deepfm; graph: ngcf, lightgcn; sequence: din, din-base)
ONLY = {"dense_arch": ("ctr",), "over_arch": ("ctr",), "patience": ("ctr", "sequence"), "max_steps": ("ctr", "sequence"),
        **{f: ("graph",) for f in ("layers", "l2", "message_dropout", "node_dropout", "eval_every", "k")},
        "activation": ("sequence",), "softmax": ("sequence",)}


def _family(model: str) -> str:
    from rectables.graph import GRAPH_MODELS
    from rectables.sequential import SEQUENCE_MODELS

    return "graph" if model in GRAPH_MODELS else "sequence" if model in SEQUENCE_MODELS else "ctr"


def _check_family(args) -> str:
    """The model's family; a flag the family does not take is an error naming it."""
    family = _family(args.model)
    wrong = [f for f, fams in ONLY.items() if family not in fams and getattr(args, f, None) not in (None, False)]
    if wrong:
        flags = ", ".join("--" + f.replace("_", "-") for f in wrong)
        raise ValueError(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --model {args.model}")
    if family != "graph":
        for k, v in CTR_DEFAULTS.items():
            if getattr(args, k, None) is None and family in ONLY.get(k, (family,)):
                setattr(args, k, v)
    return family


def _graph_spec(args) -> dict:
    from data.sources import resolve

    return {"data": str(resolve(args.data)), "model": args.model, "method": getattr(args, "method", "full"),
            "budget": parse_fraction(getattr(args, "budget", "1")), "dim": args.dim, "layers": args.layers,
            "epochs": args.epochs, "batch_size": None if args.batch_size == "auto" else args.batch_size,
            "sparse_optimizer": args.optimizer, "sparse_lr": args.sparse_lr, "dense_lr": args.dense_lr, "l2": args.l2,
            "message_dropout": args.message_dropout, "node_dropout": args.node_dropout, "seed": args.seed,
            "eval_every": args.eval_every, "k": args.k, "progress": not args.quiet}


def _din_spec(args) -> dict:
    return {"data": args.data, "model": args.model, "method": getattr(args, "method", "full"),
            "budget": parse_fraction(getattr(args, "budget", "1")), "dim": args.dim, "activation": args.activation,
            "softmax": args.softmax or None,
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "sparse_optimizer": args.optimizer,
                      **({} if args.sparse_lr is None else {"sparse_lr": args.sparse_lr}), "dense_lr": args.dense_lr,
                      "seed": args.seed, "max_steps_per_epoch": args.max_steps, "progress": not args.quiet,
                      "patience": args.patience}}


def _spec(args) -> dict:
    family = _check_family(args)
    if family == "sequence":
        return _din_spec(args)
    if family == "graph":
        return _graph_spec(args)
    last = int(args.dense_arch.split(",")[-1]) if args.dense_arch else args.dim  # None: follows --dim (and the data)
    if args.model == "dlrm" and last != args.dim:
        raise ValueError(f"DLRM's bottom MLP ends at the embedding dim: the last layer of --dense-arch "
                         f"{args.dense_arch} is {last} but --dim is {args.dim}; set --dense-arch "
                         f"{','.join(args.dense_arch.split(',')[:-1] + [str(args.dim)])} (or leave it out)")
    return {
        "data": str(args.data), "method": getattr(args, "method", "full"), "budget": parse_fraction(getattr(args, "budget", "1")),
        "dim": args.dim, "model": args.model,
        "dense_arch": [int(x) for x in args.dense_arch.split(",")] if args.dense_arch else None, "over_arch": [int(x) for x in args.over_arch.split(",")],
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "sparse_optimizer": args.optimizer,
                  **({} if args.sparse_lr is None else {"sparse_lr": args.sparse_lr}),
                  "dense_lr": args.dense_lr, "seed": args.seed,
                  "max_steps_per_epoch": args.max_steps, "progress": not args.quiet, "patience": args.patience},
    }


def cmd_train(args) -> int:
    from rectables.experiment import run_training

    family = _check_family(args)
    if family == "sequence":
        from rectables.sequential import run_din

        s = run_din(_din_spec(args), args.run, resume=args.resume, overwrite=args.overwrite)
        print(f"best val AUC {s['best_val_auc']:.4f} (epoch {s['best_epoch']}); test AUC {s['test']['auc']:.4f}, "
              f"GAUC {s['test']['gauc']:.4f}, logloss {s['test']['logloss']:.4f} -> {args.run}")
        return 0
    if family == "graph":
        from rectables.graph import run_graph

        s = run_graph(_graph_spec(args), args.run, resume=args.resume, overwrite=args.overwrite)
        last = s["last"]
        k = s["config"]["k"]
        print(f"epoch {last['epoch']}: recall@{k} {last[f'recall@{k}']:.4f}, ndcg@{k} {last[f'ndcg@{k}']:.4f}, "
              f"{s['seconds_per_epoch']:.0f} s per epoch -> {args.run}")
        return 0
    s = run_training(_spec(args), args.run, resume=args.resume, overwrite=args.overwrite)
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


#: OptEmbed flags -> (where in the pipeline's spec, its key)
OPTEMBED_FLAGS = {"alpha": ("table_options", "alpha"), "threshold_lr": ("table_options", "threshold_lr"),
                  "threshold_init": ("table_options", "threshold_init"),
                  "candidate_dims": ("table_options", "candidate_dims"), "rounds": ("search", "rounds"),
                  "population": ("search", "population"), "mutations": ("search", "mutations"),
                  "crossovers": ("search", "crossovers"), "mutation_prob": ("search", "prob"),
                  "parents": ("search", "parents"), "search_seed": ("search", "seed")}


def _optembed_settings(args) -> dict:
    """The OptEmbed flags given: {table_options: {...}, search: {...}}."""
    out: dict = {"table_options": {}, "search": {}}
    for flag, (part, key) in OPTEMBED_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            out[part][key] = [int(x) for x in v.split(",")] if flag == "candidate_dims" else v
    return out


def cmd_optembed(args) -> int:
    from rectables.optembed_run import run_optembed

    if _check_family(args) != "ctr":
        raise ValueError(f"the OptEmbed pipeline trains CTR models (dlrm, deepfm), not --model {args.model}")
    s = run_optembed({**_spec(args), "method": "optembed", **_optembed_settings(args)}, args.run,
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
    given = _optembed_settings(args)
    if (given["table_options"] or given["search"]) and "optembed" not in methods:
        raise ValueError("OptEmbed flags (--alpha, --rounds, ...) apply to method optembed, which --methods leaves out")
    compare({**_spec(args), "optembed": given}, methods, [parse_fraction(b) for b in args.budgets.split(",")], args.out,
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
    p.add_argument("--dense-lr", type=float, default=1e-3, help="learning rate of the dense layers (Adam)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (default 0: the whole split)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("graph models (ngcf, lightgcn) only")
    g.add_argument("--layers", type=int, default=None, help="propagation layers (default: 3)")
    g.add_argument("--l2", type=float, default=None, help="L2 on the batch's ego embeddings (default: 1e-4)")
    g.add_argument("--message-dropout", type=float, default=None, help="NGCF's message dropout (default: 0.1)")
    g.add_argument("--node-dropout", type=float, default=None, help="share of edges dropped per step (default: 0)")
    g.add_argument("--eval-every", type=int, default=None, help="epochs between test evaluations (default: 1)")
    g.add_argument("--k", type=int, default=None, help="cut-off of Recall@k and NDCG@k (default: 20)")
    d = p.add_argument_group("sequence models (din, din-base) only")
    d.add_argument("--activation", choices=["dice", "prelu"], default=None, help="DIN's activation (default: dice)")
    d.add_argument("--softmax", action="store_true", help="normalise DIN's attention weights (the paper does not)")


def _optembed_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("OptEmbed (method optembed): supernet and search; defaults in rectables/optembed_run.py")
    o.add_argument("--alpha", type=float, default=None, help="weight of sum exp(-threshold) in the loss (default 1e-4)")
    o.add_argument("--threshold-lr", type=float, default=None, help="learning rate of the thresholds (default 0.01)")
    o.add_argument("--threshold-init", type=float, default=None, help="starting threshold (default 0)")
    o.add_argument("--candidate-dims", default=None, help="comma list of dims to search (default 1..--dim)")
    o.add_argument("--rounds", type=int, default=None, help="rounds of the evolutionary search (default 30)")
    o.add_argument("--population", type=int, default=None, help="candidates of the first round (default 20)")
    o.add_argument("--mutations", type=int, default=None, help="children by mutation per round (default 10)")
    o.add_argument("--crossovers", type=int, default=None, help="children by crossover per round (default 10)")
    o.add_argument("--mutation-prob", type=float, default=None, help="chance a dim is redrawn (default 0.1)")
    o.add_argument("--parents", type=int, default=None, help="best candidates kept as parents (default 15)")
    o.add_argument("--search-seed", type=int, default=None, help="seed of the search (default 0)")


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
    _optembed_args(c)
    c.set_defaults(func=cmd_compare)
    o = sub.add_parser("optembed", help="OptEmbed: supernet, dim search, retrain, export of compact tables", **fmt)
    _train_args(o)
    _optembed_args(o)
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
