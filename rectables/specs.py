"""Command-line flags -> run specs: the CTR, sequence (DIN) and graph families' specs
with the flags each family takes, and OptEmbed's flags (argument group and spec parts).
``rectables/cli.py`` parses; the functions here turn what it parsed into the plain dicts
the runners take."""
from __future__ import annotations

import argparse

from rectables.presets import parse_fraction

CTR_DEFAULTS = {"dim": 16, "epochs": 1, "optimizer": "rowwise_adagrad", "over_arch": "64,1", "patience": 1,
                "max_steps": 0}
#: flags that only some model families take (ctr: dlrm, deepfm; graph: ngcf, lightgcn; sequence: din, din-base)
ONLY = {"dense_arch": ("ctr",), "over_arch": ("ctr",), "patience": ("ctr", "sequence"), "max_steps": ("ctr", "sequence"),
        **{f: ("graph",) for f in ("layers", "l2", "message_dropout", "node_dropout", "sampling", "lr_decay",
                                       "lr_decay_at", "eval_every", "k")},
        "activation": ("sequence",), "softmax": ("sequence",)}


def family_of(model: str) -> str:
    from rectables.graph import GRAPH_MODELS
    from rectables.sequential import SEQUENCE_MODELS

    return "graph" if model in GRAPH_MODELS else "sequence" if model in SEQUENCE_MODELS else "ctr"


def check_family(args) -> str:
    """The model's family; a flag the family does not take is an error naming it."""
    family = family_of(args.model)
    wrong = [f for f, fams in ONLY.items() if family not in fams and getattr(args, f, None) not in (None, False)]
    if wrong:
        flags = ", ".join("--" + f.replace("_", "-") for f in wrong)
        raise ValueError(f"{flags} {'does' if len(wrong) == 1 else 'do'} not apply to --model {args.model}")
    if family != "graph":
        for k, v in CTR_DEFAULTS.items():
            if getattr(args, k, None) is None and family in ONLY.get(k, (family,)):
                setattr(args, k, v)
    return family


def _epoch_list(text: str) -> list[int]:
    try:
        return [int(e) for e in text.split(",")]
    except ValueError:
        raise ValueError(f"--lr-decay-at takes epochs separated by commas, e.g. 40,60; got {text!r}") from None


def graph_spec(args) -> dict:
    from data.sources import resolve

    return {"data": str(resolve(args.data)), "model": args.model, "method": getattr(args, "method", "full"),
            "budget": parse_fraction(getattr(args, "budget", "1")), "dim": args.dim, "layers": args.layers,
            "epochs": args.epochs, "batch_size": None if args.batch_size == "auto" else args.batch_size,
            "sparse_optimizer": args.optimizer, "sparse_lr": args.sparse_lr, "sparse_eps": args.sparse_eps,
            "dense_lr": args.dense_lr, "l2": args.l2,
            "message_dropout": args.message_dropout, "node_dropout": args.node_dropout,
            "sampling": args.sampling, "lr_decay": args.lr_decay, "seed": args.seed,
            "lr_decay_at": None if args.lr_decay_at is None else _epoch_list(args.lr_decay_at),
            "eval_every": args.eval_every, "k": args.k, "progress": not args.quiet}


def _sparse_flags(args) -> dict:
    """The sparse optimizer's rate and epsilon where given (else the model's defaults)."""
    return {k: v for k in ("sparse_lr", "sparse_eps") if (v := getattr(args, k)) is not None}


def din_spec(args) -> dict:
    return {"data": args.data, "model": args.model, "method": getattr(args, "method", "full"),
            "budget": parse_fraction(getattr(args, "budget", "1")), "dim": args.dim, "activation": args.activation,
            "softmax": args.softmax or None,
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "sparse_optimizer": args.optimizer,
                      **_sparse_flags(args), "dense_lr": args.dense_lr,
                      "seed": args.seed, "max_steps_per_epoch": args.max_steps, "progress": not args.quiet,
                      "patience": args.patience}}


def spec_of(args) -> dict:
    """The run spec of the parsed flags, for the model's family (CTR, sequence or graph)."""
    family = check_family(args)
    if family == "sequence":
        return din_spec(args)
    if family == "graph":
        return graph_spec(args)
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
                  **_sparse_flags(args), "dense_lr": args.dense_lr, "seed": args.seed,
                  "max_steps_per_epoch": args.max_steps, "progress": not args.quiet, "patience": args.patience},
    }


#: OptEmbed's flags: name -> (part of the pipeline's spec, key there, type, help); the
#: defaults shown are the pipeline's own (rectables/optembed_run.py TABLE and SEARCH)
OPTEMBED_FLAGS = {
    "alpha": ("table_options", "alpha", float, "weight of sum exp(-threshold) in the loss"),
    "threshold_lr": ("table_options", "threshold_lr", float, "learning rate of the thresholds"),
    "threshold_init": ("table_options", "threshold_init", float, "starting threshold"),
    "candidate_dims": ("table_options", "candidate_dims", str,
                       "comma list of dims to search (default 1..--dim; --dim alone: rows only, the paper's OptEmbed-E)"),
    "rounds": ("search", "rounds", int, "rounds of the evolutionary search"),
    "population": ("search", "population", int, "candidates of the first round"),
    "mutations": ("search", "mutations", int, "children by mutation per round"),
    "crossovers": ("search", "crossovers", int, "children by crossover per round"),
    "mutation_prob": ("search", "prob", float, "chance a dim is redrawn"),
    "parents": ("search", "parents", int, "best candidates kept as parents"),
    "search_seed": ("search", "seed", int, "seed of the search"),
}


def optembed_args(p: argparse.ArgumentParser) -> None:
    """The OptEmbed flags as an argument group of ``p`` (absent from the namespace when not given)."""
    from rectables.optembed_run import SEARCH, TABLE

    o = p.add_argument_group("OptEmbed (method optembed): supernet and search")
    for flag, (part, key, kind, text) in OPTEMBED_FLAGS.items():
        default = (TABLE if part == "table_options" else SEARCH)[key]
        o.add_argument("--" + flag.replace("_", "-"), type=kind, default=argparse.SUPPRESS,  # absent: not given
                       help=text if default is None else f"{text} (default {default})")


def optembed_settings(args) -> dict:
    """The OptEmbed flags given: {table_options: {...}, search: {...}}."""
    out: dict = {"table_options": {}, "search": {}}
    for flag, (part, key, _, _) in OPTEMBED_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            out[part][key] = [int(x) for x in v.split(",")] if flag == "candidate_dims" else v
    return out
