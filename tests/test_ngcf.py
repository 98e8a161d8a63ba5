"""NGCF and LightGCN (models/ngcf.py), the NGCF-format reader, full-ranking metrics and
graph runs, on tiny hand-made graphs."""
import json
import math

import numpy as np
import pytest
import torch

from data.gowalla import Interactions, load_interactions, normalized_adjacency
from models.ngcf import GraphCF, bpr_triples
from rectables.embedding_modules import EmbeddingCollection
from rectables.optim import SparseOptimizer
from rectables.ranking import recall_ndcg
from rectables.registry import table_class
from rectables.sizing import tables_for_budget

# users 0-2, items 0-3: u0 {0, 1}, u1 {1}, u2 {2, 3}
TRAIN = Interactions(np.array([0, 2, 3, 5]), np.array([0, 1, 1, 2, 3]))
U, I = 3, 4


def dense_adjacency():
    A = torch.zeros(U + I, U + I, dtype=torch.float64)
    for u, i in zip(TRAIN.users, TRAIN.items):
        A[u, U + i] = A[U + i, u] = 1
    d = A.sum(1)
    inv = torch.where(d > 0, d.pow(-0.5), torch.zeros_like(d))
    return inv[:, None] * A * inv[None, :]


def model(kind, method="full", budget=1.0, dim=4, opt="sgd", lr=0.1, adjacency=None, **kw):
    o = SparseOptimizer(opt, lr=lr)
    tables = tables_for_budget(table_class(method), dim, ["user", "item"], [U, I], budget, o)
    kw.setdefault("message_dropout", 0.0)
    adjacency = normalized_adjacency(TRAIN, U, I) if adjacency is None else adjacency
    return GraphCF(EmbeddingCollection(tables, o), U, I, adjacency, kind=kind, **kw)


def test_normalized_adjacency_is_d_half_a_d_half():
    assert torch.allclose(normalized_adjacency(TRAIN, U, I).to_dense().double(), dense_adjacency(), atol=1e-7)


@pytest.mark.parametrize("dim", [4, 16])  # torch's sparse product; the compiled one
@pytest.mark.parametrize("kind", ["lightgcn", "ngcf"])
def test_propagation_and_its_gradient_match_a_dense_matrix_reference(kind, dim):
    torch.manual_seed(0)
    m = model(kind, layers=2, dim=dim)
    L = dense_adjacency().float()
    e0 = torch.randn(U + I, dim, requires_grad=True)
    got = m.propagate(e0)
    ref_e, outs = e0, [e0]
    for layer in range(2):
        side = L @ ref_e
        if kind == "lightgcn":
            ref_e = side
            outs.append(ref_e)
        else:
            ref_e = torch.nn.functional.leaky_relu(m.w1[layer](side + ref_e) + m.w2[layer](side * ref_e), 0.2)
            outs.append(torch.nn.functional.normalize(ref_e, dim=1))
    ref = torch.stack(outs).mean(0) if kind == "lightgcn" else torch.cat(outs, 1)
    assert torch.allclose(got, ref, atol=1e-5)
    w = torch.randn_like(ref)
    g_got, = torch.autograd.grad((got * w).sum(), e0)
    g_ref, = torch.autograd.grad((ref * w).sum(), e0)
    assert torch.allclose(g_got, g_ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["lightgcn", "ngcf"])
def test_the_loss_propagates_only_the_rows_it_reads_and_matches_full_propagation(kind):
    torch.manual_seed(0)
    m = model(kind, layers=3)
    e0 = torch.randn(U + I, 4, requires_grad=True)
    rows = torch.tensor([0, 2, 3, 6])
    full, part = m.propagate(e0), m.propagate(e0, rows)
    assert part.shape == (4, full.shape[1]) and torch.allclose(part, full[rows], atol=1e-6)
    w = torch.randn_like(part)
    g_full, = torch.autograd.grad((full[rows] * w).sum(), e0)
    g_part, = torch.autograd.grad((part * w).sum(), e0)
    assert torch.allclose(g_part, g_full, atol=1e-6)
    # the loss on a batch with repeated users and items equals BPR on the full propagation
    users, pos, neg = torch.tensor([0, 0, 2]), torch.tensor([1, 0, 3]), torch.tensor([2, 3, 0])
    m.ego, m.l2 = (lambda: e0), 0.5  # (an L2 large enough that its gradient counts below)
    f = m.propagate(e0)
    diff = (f[users] * (f[pos + U] - f[neg + U])).sum(1)
    reg = e0[torch.cat([users, pos + U, neg + U])].square().sum() / 6
    got, want = m.loss(users, pos, neg), torch.nn.functional.softplus(-diff).mean() + m.l2 * reg
    assert torch.allclose(got, want)
    assert torch.allclose(torch.autograd.grad(got, e0)[0], torch.autograd.grad(want, e0)[0], atol=1e-6)


def test_node_dropout_drops_undirected_edges_and_an_asymmetric_matrix_is_refused():
    torch.manual_seed(0)
    m = model("ngcf", node_dropout=0.5)
    m.train()
    for _ in range(5):
        a = m._adjacency().to_dense()
        assert torch.equal(a, a.T) and a.count_nonzero() < 2 * len(TRAIN.items)
    m.eval()
    assert torch.equal(m._adjacency().to_dense(), normalized_adjacency(TRAIN, U, I).to_dense())
    bad = normalized_adjacency(TRAIN, U, I).to_dense()
    bad[0, U] = 0
    with pytest.raises(ValueError, match="symmetric"):
        model("ngcf", adjacency=bad.to_sparse_csr())
    good = normalized_adjacency(TRAIN, U, I)
    # with self loops (L + I) and columns unsorted within rows (as a CSR may come): each entry
    # is kept at L's value / (1 - p) or dropped, both entries of an edge together, self
    # loops included; over many draws every entry is kept about half the time
    loops = (good.to_dense() + torch.eye(U + I)).to_sparse_csr()
    perm = torch.cat([torch.arange(a, b).flip(0) for a, b in zip(loops.crow_indices()[:-1], loops.crow_indices()[1:])])
    loops = torch.sparse_csr_tensor(loops.crow_indices(), loops.col_indices()[perm], loops.values()[perm], loops.shape)
    m = model("ngcf", adjacency=loops, node_dropout=0.5)
    dense, seen = loops.to_dense(), torch.zeros(U + I, U + I)
    for _ in range(200):
        a = m._adjacency().to_dense()
        assert torch.equal(a, a.T) and torch.equal(a[a != 0], 2 * dense[a != 0])
        seen += a != 0
    assert ((seen > 60) == (dense != 0)).all() and (seen < 140).all()
    cols = good.col_indices().clone()
    cols[-1] = U + I  # past the last node: the compiled product would read outside x
    bad = torch.sparse_csr_tensor(good.crow_indices(), cols, good.values(), (U + I, U + I), check_invariants=False)
    with pytest.raises(ValueError, match="column indices"):
        model("ngcf", adjacency=bad)


def test_message_dropout_follows_torchs_seed_is_fresh_each_step_and_is_off_in_eval():
    torch.manual_seed(0)
    m = model("ngcf", layers=2, dim=16, message_dropout=0.25)
    e0 = torch.randn(U + I, 16)
    m.train()
    torch.manual_seed(3)
    a = m.propagate(e0)
    torch.manual_seed(3)
    b, c = m.propagate(e0), m.propagate(e0)
    assert torch.equal(a, b) and not torch.equal(b, c)  # seeded, fresh per call
    assert (a[:, 16:] == 0).float().mean().item() > 0.1  # the layers' outputs lose about a quarter
    m.eval()
    m.message_dropout = 0.0
    off = m.propagate(e0)
    m.message_dropout = 0.25
    assert torch.equal(m.propagate(e0), off)


def test_recall_and_ndcg_by_hand_with_training_items_excluded():
    # one dim: user scores are the item embeddings times the user's value
    items = torch.tensor([[4.0], [3.0], [2.0], [1.0], [0.0]])  # ranking for a positive user: 0, 1, 2, 3, 4
    users = torch.tensor([[1.0], [1.0], [-1.0]])
    train = Interactions(np.array([0, 1, 1, 1]), np.array([0]))  # u0 trained on item 0: it must not count
    test = Interactions(np.array([0, 2, 4, 4]), np.array([0, 2, 1, 4]))  # u0 {0, 2}; u1 {1, 4}; u2 none
    r = recall_ndcg(users, items, train, test, k=2)
    # u0: item 0 excluded -> top 2 = [1, 2]: hits [0, 1]; recall 1/2; dcg 1/log2(3); ideal 1 + 1/log2(3)
    # u1: top 2 = [0, 1]: hits [0, 1]; recall 1/2; same dcg and ideal (2 test items, k = 2)
    # u2: no test items: skipped
    ndcg = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert r["users"] == 2 and r["recall"] == pytest.approx(0.5) and r["ndcg"] == pytest.approx(ndcg)
    r = recall_ndcg(users, items, Interactions(np.array([0, 0, 0, 0]), np.array([], dtype=np.int64)),
                    Interactions(np.array([0, 1, 1, 1]), np.array([3])), k=3)
    # ideal over min(k, 1 test item) = 1 relevant item: rank 4 > k -> 0; with k = 4 -> 1/log2(5)
    assert r["ndcg"] == 0 and recall_ndcg(users, items, Interactions(np.array([0, 0, 0, 0]), np.array([], dtype=np.int64)),
                                          Interactions(np.array([0, 1, 1, 1]), np.array([3])), k=4)["ndcg"] \
        == pytest.approx(1 / math.log2(5))


def test_recall_and_ndcg_in_chunks_match_a_per_user_loop():
    # chunks of 5 (the last shorter, some with users without test items, so chunks of other
    # sizes reuse the score buffer), ties broken as topk breaks them: distinct scores
    rng = np.random.default_rng(0)
    U_, I_, k = 23, 17, 4

    def split(p):
        lists = [np.sort(rng.choice(I_, rng.integers(0, 5), replace=False)) if rng.random() < p else np.array([], int)
                 for _ in range(U_)]
        return lists, Interactions(np.r_[0, np.cumsum([len(x) for x in lists])], np.concatenate(lists).astype(np.int64))

    (tr_lists, train), (te_lists, test) = split(1.0), split(0.7)
    users, items = torch.randn(U_, 3, dtype=torch.float64), torch.randn(I_, 3, dtype=torch.float64)
    recall = ndcg = n = 0
    for u in range(U_):
        want = set(te_lists[u].tolist())
        if not want:
            continue
        ranked = [i for i in torch.argsort(items @ users[u], descending=True).tolist() if i not in set(tr_lists[u])][:k]
        hits = [i in want for i in ranked]
        recall += sum(hits) / len(want)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcg += dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(want))))
        n += 1
    r = recall_ndcg(users, items, train, test, k=k, chunk=5)
    assert r["users"] == n and r["recall"] == pytest.approx(recall / n) and r["ndcg"] == pytest.approx(ndcg / n)


@pytest.mark.parametrize("sampling", ["user", "interaction"])
def test_bpr_triples_follow_their_sampling_and_never_draw_a_training_item(sampling):
    train = Interactions(np.array([0, 2, 2, 3, 5]), np.array([0, 1, 1, 2, 3]))  # u1 has no items
    rng = np.random.default_rng(0)
    seen = set(zip(train.users, train.items))
    draws = [bpr_triples(train, I, rng, sampling) for _ in range(400)]
    for users, pos, neg in draws:
        assert len(users) == len(train.items) and {(u, i) for u, i in zip(users, pos)} <= seen
        assert not any((u, j) in seen for u, j in zip(users, neg))
        if sampling == "interaction":  # every interaction once
            assert sorted(zip(users, pos)) == sorted(zip(train.users, train.items))
    if sampling == "user":  # users uniform among those with items, then items uniform within the user
        users, pos = np.concatenate([d[0] for d in draws]), np.concatenate([d[1] for d in draws])
        share = np.bincount(users, minlength=4) / len(users)
        assert share[1] == 0 and np.allclose(share[[0, 2, 3]], 1 / 3, atol=0.03)
        assert abs((pos[users == 0] == 0).mean() - 0.5) < 0.05 and abs((pos[users == 3] == 2).mean() - 0.5) < 0.05
    with pytest.raises(ValueError, match="sampling"):
        bpr_triples(train, I, rng, "edges")


@pytest.mark.parametrize("method, budget", [("full", 1.0), ("hash", 0.5), ("multihash", 0.5), ("unified", 0.5),
                                            ("compositional", 0.5), ("dynamic", 1.0)])
@pytest.mark.parametrize("kind", ["lightgcn", "ngcf"])
def test_every_method_learns_the_training_pairs(kind, method, budget):
    torch.manual_seed(0)
    m = model(kind, method, budget, dim=8, opt="rowwise_adagrad", lr=0.2, l2=0.0)
    dense = torch.optim.Adam(list(m.w1.parameters()) + list(m.w2.parameters()), lr=0.01) if kind == "ngcf" else None
    users, pos = torch.from_numpy(TRAIN.users), torch.from_numpy(TRAIN.items)
    neg = torch.tensor([3, 3, 0, 0, 1])  # items the users never had
    losses = []
    for _ in range(40):
        loss = m.loss(users, pos, neg)
        if dense:
            dense.zero_grad()
        loss.backward()
        if dense:
            dense.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def _write_dataset(d):
    d.mkdir()
    (d / "train.txt").write_text("0 0 1\n1 1\n2 2 3\n")
    (d / "test.txt").write_text("0 2\n1 0 3\n2 1\n")


def test_reader_and_a_graph_run_that_resumes_exactly(tmp_path):
    from rectables.graph import run_graph

    _write_dataset(tmp_path / "g")
    train, test, n_users, n_items = load_interactions(tmp_path / "g")
    assert (n_users, n_items) == (3, 4) and train.items.tolist() == [0, 1, 1, 2, 3] and test.offsets.tolist() == [0, 1, 3, 4]
    spec = {"data": str(tmp_path / "g"), "model": "ngcf", "dim": 4, "batch_size": 2, "progress": False,
            "node_dropout": 0.2, "sparse_optimizer": "rowwise_adagrad", "sparse_lr": 0.1}
    whole = run_graph({**spec, "epochs": 3}, tmp_path / "a")
    run_graph({**spec, "epochs": 1}, tmp_path / "b")
    resumed = run_graph({**spec, "epochs": 3}, tmp_path / "b", resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["last"]["recall@20"] == whole["last"]["recall@20"]
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "a" / "config.json").read_text())["message_dropout"] == 0.1  # NGCF's default
    with pytest.raises(ValueError, match="unknown entries.*'layer'"):
        run_graph({**spec, "layer": 2}, tmp_path / "c")
    with pytest.raises(ValueError, match="sampling must be one of"):
        run_graph({**spec, "sampling": "users"}, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_step_schedule_scales_both_rates_after_its_epochs_and_resumes_exactly(tmp_path):
    from rectables.graph import run_graph, set_rates, build_graph_model, resolve_spec

    _write_dataset(tmp_path / "g")
    spec = {"data": str(tmp_path / "g"), "model": "ngcf", "dim": 4, "batch_size": 2, "progress": False,
            "sparse_lr": 0.1, "dense_lr": 0.01, "lr_decay": 0.5, "lr_decay_at": [1, 2]}
    whole = run_graph({**spec, "epochs": 3}, tmp_path / "a")
    plain = run_graph({**spec, "epochs": 3, "lr_decay": 1.0, "lr_decay_at": []}, tmp_path / "p")
    assert plain["history"][0]["loss"] == whole["history"][0]["loss"] != whole["history"][1]["loss"]
    assert plain["history"][1]["loss"] != whole["history"][1]["loss"]
    run_graph({**spec, "epochs": 2}, tmp_path / "b")
    resumed = run_graph({**spec, "epochs": 3}, tmp_path / "b", resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    full = resolve_spec({**spec, "epochs": 3})
    train, _, n_users, n_items = load_interactions(tmp_path / "g")
    m = build_graph_model(full, train, n_users, n_items)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
    assert set_rates(m, full, opt, [0.01], 2) == 0.25
    assert opt.param_groups[0]["lr"] == 0.0025 and m.embedding.storage.optimizer.lr == 0.025
    for bad in ({"lr_decay": 0.5, "lr_decay_at": []}, {"lr_decay": 1.0, "lr_decay_at": [3]},
                {"lr_decay": 1.5, "lr_decay_at": [1]},
                {"lr_decay": 0.5, "lr_decay_at": [2, 1]}):
        with pytest.raises(ValueError, match="lr_decay"):
            run_graph({**spec, **bad}, tmp_path / "c")


def test_a_run_from_before_sampling_and_decay_existed_resumes_only_as_it_was_made(tmp_path):
    from rectables.graph import run_graph
    from rectables.runs import RunError

    _write_dataset(tmp_path / "g")
    spec = {"data": str(tmp_path / "g"), "model": "lightgcn", "dim": 4, "batch_size": 2, "progress": False}
    run_graph({**spec, "epochs": 1, "sampling": "interaction"}, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for k in ("sampling", "lr_decay", "lr_decay_at"):
        del config[k]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="sampling: None -> 'user'"):
        run_graph({**spec, "epochs": 2}, tmp_path / "old", resume=True)
    assert len(run_graph({**spec, "epochs": 2, "sampling": "interaction"}, tmp_path / "old", resume=True)["history"]) == 2


def test_a_bad_interaction_file_is_named(tmp_path):
    d = tmp_path / "g"
    _write_dataset(d)
    (d / "test.txt").write_text("0 2\n1 x\n")
    with pytest.raises(ValueError, match="test.txt:2: not a line of integers"):
        load_interactions(d)


def test_command_line_trains_a_graph_model_and_refuses_flags_of_the_other_family(tmp_path, capsys):
    from rectables.cli import main

    _write_dataset(tmp_path / "g")
    assert main(["train", "--model", "lightgcn", "--data", str(tmp_path / "g"), "--run", str(tmp_path / "r"),
                 "--epochs", "2", "--dim", "8", "--batch-size", "4", "--sampling", "interaction", "--quiet"]) == 0
    assert "epoch 2: recall@20" in capsys.readouterr().out
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["dim"], config["sparse_optimizer"], config["batch_size"], config["sampling"]) == (8, "adam", 4,
                                                                                                    "interaction")
    assert main(["train", "--model", "lightgcn", "--data", str(tmp_path / "g"), "--run", str(tmp_path / "r2"),
                 "--over-arch", "32,1", "--patience", "2"]) == 1
    assert "--over-arch, --patience do not apply to --model lightgcn" in capsys.readouterr().err
    assert main(["train", "--model", "dlrm", "--data", str(tmp_path / "g"), "--run", str(tmp_path / "r3"),
                 "--layers", "2", "--sampling", "user"]) == 1
    assert "--layers, --sampling do not apply to --model dlrm" in capsys.readouterr().err
    assert main(["train", "--model", "ngcf", "--data", str(tmp_path / "g"), "--run", str(tmp_path / "r4"),
                 "--lr-decay", "0.1", "--lr-decay-at", "40;60"]) == 1
    assert "--lr-decay-at takes epochs separated by commas" in capsys.readouterr().err
    assert main(["train", "--model", "ngcf", "--data", str(tmp_path / "g"), "--run", str(tmp_path / "r5"), "--epochs",
                 "2", "--dim", "4", "--lr-decay", "0.1", "--lr-decay-at", "1", "--quiet"]) == 0
    config = json.loads((tmp_path / "r5" / "config.json").read_text())
    assert (config["lr_decay"], config["lr_decay_at"]) == (0.1, [1])


def test_compare_runs_a_graph_model_with_ranking_columns(tmp_path):
    from rectables.compare import compare

    _write_dataset(tmp_path / "g")
    spec = {"data": str(tmp_path / "g"), "model": "lightgcn", "dim": 4, "epochs": 2, "batch_size": 2, "progress": False}
    rows = compare(spec, ["full", "hash"], [0.5], tmp_path / "cmp", seeds=[0, 1])
    assert [r["method"] for r in rows] == ["full", "hash"] and all(0 <= r["auc"] <= 1 for r in rows)
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| test Recall@20 | ΔRecall@20 | NDCG@20 |" in text and "base rate" not in text
    run = json.loads((tmp_path / "cmp" / "full_1_seed1" / "config.json").read_text())
    assert run["seed"] == 1 and (tmp_path / "cmp" / "pareto.png").exists()


def test_the_graph_loop_adds_the_tables_extra_loss_and_calls_their_step_hook(tmp_path, monkeypatch):
    """Every training loop honours the table contract's hooks: an OptEmbed table's threshold
    term pushes its thresholds up, and on_step_end sees every step."""
    from rectables.graph import run_graph
    from rectables.methods.optembed import OptEmbedTable

    seen = []
    monkeypatch.setattr(OptEmbedTable, "on_step_end", lambda self, step: seen.append(step))
    monkeypatch.setattr(OptEmbedTable, "extra_loss", lambda self: 1e3 * torch.exp(-self.threshold).sum())
    _write_dataset(tmp_path / "g")
    spec = {"data": str(tmp_path / "g"), "model": "lightgcn", "dim": 4, "batch_size": 2, "progress": False,
            "epochs": 2, "method": "optembed", "sparse_optimizer": "rowwise_adagrad", "sparse_lr": 0.1}
    run_graph(spec, tmp_path / "a")
    from rectables.runs import read_checkpoint

    state = read_checkpoint(tmp_path / "a" / "last.pt")["model"]
    thresholds = [v for k, v in state.items() if k.endswith("threshold")]
    assert thresholds and all((t > 0).all() for t in thresholds)  # from 0, pushed up by the extra loss
    assert seen == sorted(seen) and seen[-1] == len(seen) // 2 and len(seen) == 2 * seen[-1]  # two tables, every step
