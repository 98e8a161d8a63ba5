"""OptEmbed: the straight-through step, thresholds, dim prefixes, the search, export parity,
the pipeline from Python and the CLI."""
import json

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from rectables.evolution import evolve
from rectables.methods.optembed import MaskRows, step_grad
from rectables.optembed_run import SUPERNET_EPS
from tests.helpers import random_kjt

FEATS = ["a", "b"]
N, D = 50, 8


def _surrogate(x):
    """An antiderivative of the paper's derivative: 2 - 4|x| (|x| <= 0.4), 0.4 (<= 1), 0."""
    a = x.abs()
    inner = 2 * a - 2 * a * a
    mid = 0.48 + 0.4 * (a - 0.4)
    return torch.sign(x) * torch.where(a <= 0.4, inner, torch.where(a <= 1, mid, torch.full_like(a, 0.72)))


class _WithStepGrad(torch.autograd.Function):
    """The surrogate forward with the library's derivative as its backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _surrogate(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * step_grad(x)


def test_straight_through_derivative_is_the_papers_long_tail_gradcheck():
    x = torch.tensor([-1.7, -0.9, -0.55, -0.3, -0.05, 0.02, 0.25, 0.39, 0.41, 0.7, 0.97, 1.3, 3.0],
                     dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WithStepGrad.apply, (x,), eps=1e-6, atol=1e-6)
    assert step_grad(torch.tensor([0.0, 0.4, 1.0, 1.01])).tolist() == pytest.approx([2.0, 0.4, 0.4, 0.0])
    # the mask's threshold gradient is that derivative: rows of one value v, threshold th,
    # out = v * step(|v| - th), d out / d th = -step_grad(|v| - th) * v
    for native in (True, False):
        v = torch.tensor([0.1, -0.5, 0.9, 2.0, -1.6]).view(5, 1, 1)
        th = torch.tensor([0.6], requires_grad=True)
        out = MaskRows.apply(v, th, torch.ones(5, 1, dtype=torch.int64), True, native)
        assert torch.equal(out.view(-1), torch.tensor([0.0, 0.0, 0.9, 2.0, -1.6]))  # the unit step
        g = torch.randn(5, 1, 1)
        out.backward(g)
        x = v.abs().view(-1) - 0.6
        torch.testing.assert_close(th.grad, -(step_grad(x) * g.view(-1) * v.view(-1)).sum().view(1))


def _ebc(alpha=1e-4, dims=None, pooled=True, lr=0.05, **kw):
    tables = [rectables.create_table("optembed", name=f"t_{f}", embedding_dim=D, feature_names=[f], num_ids=N,
                                     alpha=alpha, candidate_dims=dims, seed=i, **kw) for i, f in enumerate(FEATS)]
    cls = rectables.EmbeddingBagCollection if pooled else rectables.EmbeddingCollection
    return cls(tables, rectables.SparseOptimizer("rowwise_adagrad", lr=lr))


def _train_supernet(alpha: float, steps: int = 150) -> tuple[list[float], list[float]]:
    """(thresholds, share of rows pruned) per feature after training on a target that
    feature a decides (b is noise)."""
    torch.manual_seed(0)
    ebc = _ebc(alpha, threshold_lr=0.01, lr=0.005)
    head = torch.nn.Linear(len(FEATS) * D, 1)
    opt = torch.optim.Adam(rectables.memory.dense_param_groups(torch.nn.ModuleList([ebc, head]), 0.01), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, N, (len(FEATS) * 64,), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(FEATS, ids, torch.ones(len(ids), dtype=torch.int64))
        y = (ids[:64] % 2).float()  # feature a's parity decides
        extra = ebc.extra_loss()
        loss = torch.nn.functional.mse_loss(head(ebc(kjt).values()).squeeze(1), y) + (0 if extra is None else extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pruned = [1 - float(t.row_masks(_weights(ebc, i)).float().mean()) for i, t in enumerate(ebc.tables)]
    return [float(t.threshold.detach()) for t in ebc.tables], pruned


def _weights(ebc, i):
    return ebc.table_weights(ebc.tables[i].name)


def test_thresholds_rise_and_more_rows_are_pruned_as_alpha_grows():
    results = [_train_supernet(a) for a in (0.0, 3e-3, 1.0)]
    thresholds = [sum(t) for t, _ in results]
    pruned = [sum(p) / 2 for _, p in results]
    assert thresholds[0] < thresholds[1] < thresholds[2], thresholds
    assert pruned[0] <= pruned[1] <= pruned[2] and pruned[2] > pruned[0] + 0.3, pruned
    assert pruned[2] > 0.5
    a, b = results[1][1]
    assert b > a + 0.5, results[1]  # the noise feature's rows go first


def test_a_row_below_its_threshold_reads_zeros_and_the_thresholds_train_at_their_own_rate():
    ebc = _ebc()
    ebc.eval()
    kjt = random_kjt(FEATS, 6, 1, num_ids=N)
    with torch.no_grad():
        ebc.tables[0].threshold.fill_(1e6)  # every row of feature a pruned
    out = ebc(kjt).values()
    assert (out[:, :D] == 0).all() and (out[:, D:] != 0).any()
    groups = rectables.memory.dense_param_groups(ebc, 0.5)
    rates = sorted(g["lr"] for g in groups)
    assert rates == [0.01] and len(groups[0]["params"]) == 2  # the thresholds' own rate, not 0.5


@pytest.mark.parametrize("pooled", [True, False])
def test_training_keeps_a_prefix_of_d_dims_per_sample_and_feature(pooled):
    torch.manual_seed(0)
    ebc = _ebc(alpha=0, dims=[2, 5, 8], pooled=pooled, threshold_init=-10.0)
    kjt = random_kjt(FEATS, 400, 3, num_ids=N)
    out = ebc(kjt)
    seen = set()
    for f_i, f in enumerate(FEATS):
        if pooled:
            block, bags = out.values()[:, f_i * D : (f_i + 1) * D], torch.arange(400)
            nonempty = kjt[f].lengths() > 0
            block, bags = block[nonempty], bags[nonempty]
        else:
            block = out[f].values()
            bags = torch.repeat_interleave(torch.arange(400), kjt[f].lengths())
        kept = (block != 0).sum(1)  # uniform rows are never exactly 0: nonzeros = the prefix kept
        assert set(kept.tolist()) <= {2, 5, 8}
        for b in bags.unique():  # every id of a sample keeps the same prefix
            assert len(set(kept[bags == b].tolist())) == 1
        first_zero = torch.where(block == 0, torch.arange(D), D).min(1).values
        assert torch.equal(torch.minimum(first_zero, torch.tensor(D)), kept)  # zeros only after the prefix
        seen |= set(kept.tolist())
    assert seen == {2, 5, 8}
    ebc.eval()  # evaluation: all dims
    with torch.no_grad():
        full = ebc(kjt)
    vals = full.values() if pooled else full["a"].values()
    assert ((vals != 0).sum(1) == D).any()


def test_search_is_deterministic_never_loses_its_best_and_leaves_parents_alone():
    target = [3, 1, 4, 1, 5, 2, 6, 5]
    calls = []

    def fitness(dims):
        calls.append(tuple(dims))
        return -sum(abs(a - b) for a, b in zip(dims, target))

    runs = []
    for _ in range(2):
        calls.clear()
        runs.append(evolve(fitness, len(target), list(range(1, 9)), rounds=12, seed=7))
    assert runs[0] == runs[1]
    assert len(set(calls)) == len(calls)  # each candidate scored once
    best = [r["best"] for r in runs[0]["history"]]
    assert all(b2 >= b1 for b1, b2 in zip(best, best[1:])) and best[-1] > best[0]
    # a parent changed in place would keep the score of the dims it had: every round's best
    # dims must still score what the round reports
    assert all(fitness(r["best_dims"]) == r["best"] for r in runs[0]["history"])
    assert runs[0]["fitness"] == best[-1] == fitness(runs[0]["dims"])
    assert evolve(fitness, len(target), list(range(1, 9)), rounds=12, seed=8)["history"] != runs[0]["history"]
    with pytest.raises(ValueError, match="probability"):
        evolve(fitness, 3, [1, 2], prob=1.5)


def test_crossover_cuts_between_features():
    """With mutation off, every child of a round is a prefix of one of that round's parents
    (the best candidates scored before it) joined to the rest of another, cut between
    features, never inside one."""
    seen = []
    fitness = lambda d: seen.append(tuple(d)) or float(sum(d))  # noqa: E731
    out = evolve(fitness, 6, [1, 2, 3, 4], population=4, mutations=0, crossovers=8, rounds=3, prob=0.0,
                 parents=4, seed=1)
    scored = [0] + [h["scored"] for h in out["history"]]
    assert scored[-1] > scored[1]  # later rounds scored new children
    for r in range(1, len(scored) - 1):
        parents = sorted(seen[: scored[r]], key=lambda c: (-sum(c), c))[:4]
        for child in seen[scored[r] : scored[r + 1]]:
            assert any(child == a[:c] + b[c:] for a in parents for b in parents if a != b for c in range(1, 6)), child


def _fixed(pooled=True):
    """An OptEmbed collection trained a little, then fixed: half the rows kept, dims 3 and 6."""
    torch.manual_seed(0)
    ebc = _ebc(pooled=pooled)
    for t, keep_every in zip(ebc.tables, (2, 3)):
        t.fix(torch.arange(N).unsqueeze(0) % keep_every == 0, [3 if t.name == "t_a" else 6])
    return ebc


@pytest.mark.parametrize("pooled", [True, False])
def test_export_equals_the_masked_model_and_pruned_ids_read_zeros(pooled):
    ebc = _fixed(pooled)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):  # train with the mask fixed: the zero row must stay zero
        kjt = random_kjt(FEATS, 16, 3, num_ids=N, gen=gen)
        out = ebc(kjt)
        vals = out.values() if pooled else torch.cat([out[f].values() for f in FEATS])
        (vals * torch.randn_like(vals)).sum().backward()
    for i, t in enumerate(ebc.tables):
        assert (_weights(ebc, i)[0][N] == 0).all()
    tables, rows = zip(*[t.compact(_weights(ebc, i)) for i, t in enumerate(ebc.tables)])
    cls = rectables.EmbeddingBagCollection if pooled else rectables.EmbeddingCollection
    compact = cls(list(tables), rectables.SparseOptimizer("rowwise_adagrad", lr=0.05))
    with torch.no_grad():
        for i, r in enumerate(rows):
            _weights(compact, i)[0].copy_(r[0])
    assert [t.rows for t in compact.tables] == [[25], [17]] and [t.dims for t in compact.tables] == [[3], [6]]
    kjt = random_kjt(FEATS, 32, 4, num_ids=N, gen=gen)
    ebc.eval()
    compact.eval()
    with torch.no_grad():
        a, b = ebc(kjt), compact(kjt)
    if pooled:
        assert torch.equal(a.values(), b.values()) and (a.values()[:, 3:D] == 0).all()
    else:
        for f in FEATS:
            assert torch.equal(a[f].values(), b[f].values())
        ids = kjt["a"].values()
        assert (a["a"].values()[ids % 2 == 1] == 0).all() and (a["a"].values()[ids % 2 == 0, :3] != 0).all()
    rep = rectables.memory_report(compact)["tables"]
    full_bytes = 4 * (N * D + N)  # weights and row-wise state of a full table per feature
    assert rep["t_a"]["total"] < full_bytes / 2 and rep["t_a"]["buffers"] == 4 * N  # the int32 remap counts


def test_compact_table_trained_further_keeps_pruned_ids_at_zero():
    ebc = _fixed()
    tables, rows = zip(*[t.compact(_weights(ebc, i)) for i, t in enumerate(ebc.tables)])
    compact = rectables.EmbeddingBagCollection(list(tables), rectables.SparseOptimizer("adam", lr=0.1))
    for i, r in enumerate(rows):
        with torch.no_grad():
            _weights(compact, i)[0].copy_(r[0])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=torch.tensor([1, 2, 3, 1, 4]),
                                              lengths=torch.tensor([2, 1, 1, 1]))
    for _ in range(3):
        compact(kjt).values().sum().backward()
    assert (_weights(compact, 0)[0][25] == 0).all() and (_weights(compact, 1)[0][17] == 0).all()
    out = compact(kjt).values()
    assert (out[1, :D] == 0).all()  # sample 1 of feature a holds id 3 only: pruned (odd)


def test_optembed_takes_no_budget_by_name():
    with pytest.raises(ValueError, match="'optembed'.*takes no budget"):
        rectables.registry.table_class("optembed").for_budget("t", 8, ["a"], 100, 0.25)
    from rectables.experiment import IncompatibleMethod, check_budget

    with pytest.raises(IncompatibleMethod, match="learns its own size"):
        check_budget({"method": "optembed", "budget": 0.25})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rectables.cli import main

    d = tmp_path_factory.mktemp("oe")
    assert main(["synth", "--rows", "6000", "--out", str(d / "d.tsv"), "--scale", "0.0005"]) == 0
    assert main(["preprocess", str(d / "d.tsv"), "--out", str(d / "p")]) == 0
    return d


def test_pipeline_from_the_cli_leaves_every_stage_and_the_export_scores_like_the_retrained(tiny, capsys):
    from rectables.cli import main

    run = tiny / "run"
    args = ["optembed", "--data", str(tiny / "p"), "--run", str(run), "--batch-size", "256", "--quiet",
            "--rounds", "3", "--population", "6", "--mutations", "3", "--crossovers", "3", "--alpha", "0.01",
            "--threshold-lr", "0.02"]
    assert main(args + ["--until", "search"]) == 0
    assert (run / "supernet" / "best.pt").exists() and (run / "init.pt").exists() and not (run / "retrain").exists()
    rounds = [json.loads(line) for line in (run / "search.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert main(args) == 1  # a run is there: resume or overwrite
    assert main(args + ["--resume"]) == 0
    s = json.loads((run / "export" / "summary.json").read_text())
    assert s["max_abs_diff_vs_retrained"] < 1e-5
    assert s["test"]["auc"] == pytest.approx(s["retrained_test"]["auc"], abs=1e-6)
    assert max(s["pruned"]) > 0 and len(s["dims"]) == 26 and 0 < s["rows_pruned"] < 1
    assert s["settings"] == {"tables": 26, "rows_pruned": round(s["rows_pruned"], 3),
                             "mean_dim": round(sum(s["dims"]) / 26, 1)}
    assert set(s["stages"]) == {"supernet_s", "search_s", "retrain_s", "export_s"}
    retrain_cfg = json.loads((run / "retrain" / "config.json").read_text())
    assert retrain_cfg["stage"]["dims"] == json.loads((run / "search.json").read_text())["dims"]
    # the supernet's rows train with a larger epsilon (norms that rank rows by use); the retrain does not
    assert json.loads((run / "supernet" / "config.json").read_text())["train"]["sparse_eps"] == SUPERNET_EPS
    assert retrain_cfg["train"]["sparse_eps"] == 1e-8
    capsys.readouterr()
    assert main(["train", "--data", str(tiny / "p"), "--method", "optembed", "--run", str(tiny / "sup_only"),
                 "--batch-size", "256", "--quiet"]) == 0
    assert "supernet only" in capsys.readouterr().out  # not mistaken for the whole method
    assert main(["eval", "--run", str(run / "export"), "--data", str(tiny / "p")]) == 0
    assert f"AUC {s['test']['auc']:.4f}" in capsys.readouterr().out
    assert main(["compare", "--data", str(tiny / "p"), "--methods", "full,hash", "--alpha", "0.1",
                 "--out", str(tiny / "x")]) == 1  # an OptEmbed flag without optembed is refused
    assert "--alpha" in capsys.readouterr().err


def test_compare_runs_the_pipeline_and_reports_the_exported_bytes(tiny):
    from rectables.compare import compare

    spec = {"data": str(tiny / "p"), "dense_arch": [16, 16], "over_arch": [16, 1],
            "train": {"batch_size": 256, "progress": False},
            "optembed": {"search": {"rounds": 2, "population": 4, "mutations": 2, "crossovers": 2},
                         "table_options": {"alpha": 0.01, "threshold_lr": 0.02}}}
    rows = compare(spec, ["full", "optembed"], [0.25], tiny / "cmp", baselines=False)
    by = {r["method"]: r for r in rows}
    assert by["optembed"]["bytes"] < by["full"]["bytes"]
    assert by["optembed"]["budget"] == 1.0
    text = (tiny / "cmp" / "comparison.md").read_text()
    assert "| optembed | learned |" in text and "picks its own size" in text


def test_table_options_build_the_tables_and_are_refused_by_name(tiny):
    from data.preprocess import open_dataset
    from rectables.experiment import build_model

    meta = open_dataset(tiny / "p")
    spec = {"method": "optembed", "budget": 1.0, "dim": 8, "model": "dlrm", "dense_arch": [8], "over_arch": [4, 1],
            "table_options": {"alpha": 0.5, "candidate_dims": [2, 8]}}
    model = build_model(spec, meta)
    t = model.embedding.tables[3]
    assert (t.alpha, t.candidate_dims, t.num_ids) == (0.5, [2, 8], meta["cardinalities"][3])
    with pytest.raises(ValueError, match="table_options for method 'optembed'.*alfa"):
        build_model({**spec, "table_options": {"alfa": 0.5}}, meta)
    with pytest.raises(ValueError, match="one dict, or a list of 26"):
        build_model({**spec, "table_options": [{}, {}]}, meta)
    with pytest.raises(ValueError, match="take no budget"):
        build_model({**spec, "method": "hash", "budget": 0.5, "table_options": {"num_buckets": 10}}, meta)


def test_cached_search_fitness_equals_a_full_evaluation_with_those_dims(tiny):
    from data.loader import CriteoBatches
    from rectables.experiment import run_training
    from rectables.optembed_run import _open, _set_dims, cached_fitness
    from rectables.train import evaluate

    spec = {"data": str(tiny / "p"), "method": "optembed", "dense_arch": [16, 16], "over_arch": [16, 1],
            "table_options": {"alpha": 0.01, "threshold_lr": 0.05},
            "train": {"batch_size": 128, "progress": False}}
    run_training(spec, tiny / "sup")
    model, _ = _open(spec, tiny / "sup")
    val = CriteoBatches(str(tiny / "p"), "val", 256)
    fitness = cached_fitness(model, val)
    assert sum(float(t.row_masks([w]).float().mean() < 1) for t, w in
               zip(model.embedding.tables, [p.weight for p in model.embedding.embedding_bags.values()])) > 0
    for dims in ([16] * 26, [1 + (i * 5) % 16 for i in range(26)]):
        _set_dims(model, dims)
        assert fitness(dims) == evaluate(model, val)["auc"]
    assert fitness([1] * 26) != fitness([16] * 26)
