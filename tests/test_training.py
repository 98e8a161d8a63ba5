"""Models x methods overfit a batch; resume is exact; the CLI runs end to end; real Criteo."""
import json
from pathlib import Path

import pytest
import torch

import rectables
from models.deepfm import DeepFM
from models.dlrm import DLRM
from rectables.cli import main
from rectables.experiment import run_training
from rectables.registry import table_class
from tests.helpers import random_kjt

CRITEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "criteo_dac_train_sample.tsv.gz"
FEATS = ["a", "b", "c", "d"]


def _model(kind, method):
    tables = [table_class(method).for_budget(f"t_{f}", 8, [f], 40, 0.5, seed=i) for i, f in enumerate(FEATS)]
    ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("adam", lr=0.05))
    return DLRM(ebc, 13, [16, 8], [16, 1]) if kind == "dlrm" else DeepFM(ebc, 13, [16])


@pytest.mark.parametrize("kind", ["dlrm", "deepfm"])
@pytest.mark.parametrize("method", rectables.list_tables())
def test_every_model_and_method_overfits_a_batch(kind, method):
    torch.manual_seed(0)
    model = _model(kind, method)
    kjt = random_kjt(FEATS, 64, 2, num_ids=40)
    dense, labels = torch.randn(64, 13), (torch.rand(64) < 0.5).float()
    opt = torch.optim.Adam(rectables.dense_parameters(model), lr=0.01)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    assert main(["synth", "--rows", "6000", "--out", str(d / "d.tsv"), "--scale", "0.0005"]) == 0
    assert json.loads((d / "d.tsv.json").read_text())["rows"] == 6000  # facts of the planted model
    assert main(["preprocess", str(d / "d.tsv"), "--out", str(d / "p")]) == 0
    return d


def _spec(d, epochs, method="hash"):
    return {"data": str(d / "p"), "method": method, "budget": 0.5, "dense_arch": [16, 16], "over_arch": [16, 1],
            "train": {"epochs": epochs, "batch_size": 512, "patience": 5, "progress": False, "sparse_optimizer": "adam"}}


@pytest.mark.parametrize("method", ["hash", "dynamic"])  # dynamic: the map, counters and sketch resume too
def test_resume_continues_exactly(tiny, method):
    full = run_training(_spec(tiny, 3, method), tiny / f"r_full_{method}")
    run_training(_spec(tiny, 1, method), tiny / f"r_split_{method}")
    resumed = run_training(_spec(tiny, 3, method), tiny / f"r_split_{method}", resume=True)
    a = [h["val_auc"] for h in full["history"]]
    b = [h["val_auc"] for h in resumed["history"]]
    assert a == b and len(a) == 3
    assert full["test"] == resumed["test"]
    lines = (tiny / f"r_split_{method}" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_cli_train_eval_compare(tiny, capsys):
    args = ["--data", str(tiny / "p"), "--dense-arch", "16,16", "--over-arch", "16,1", "--batch-size", "512", "--quiet"]
    assert main(["train", *args, "--method", "multihash", "--budget", "1/4", "--run", str(tiny / "run")]) == 0
    cfg = json.loads((tiny / "run" / "config.json").read_text())
    assert cfg["id_mode"] == "vocab" and cfg["method"] == "multihash" and cfg["budget"] == 0.25
    for name in ["metrics.jsonl", "memory.json", "summary.json", "best.pt", "last.pt"]:
        assert (tiny / "run" / name).exists(), name
    assert main(["eval", "--run", str(tiny / "run"), "--data", str(tiny / "d.tsv")]) == 0
    assert "AUC" in capsys.readouterr().out
    assert main(["compare", *args, "--methods", "full,hash,dynamic", "--budgets", "1/4", "--out", str(tiny / "cmp")]) == 0
    table = (tiny / "cmp" / "comparison.md").read_text()
    assert "| full | 1 |" in table and "| hash | 0.25 |" in table
    # table bytes count everything a table holds: a dynamic table's map is most of its non-weight bytes
    mem = json.loads((tiny / "cmp" / "dynamic_0.25" / "memory.json").read_text())["tables"]["t_dynamic"]
    assert mem["buffers"] > 0.3 * mem["weights"]
    assert f"| dynamic | 0.25 | {mem['rows']:,} | {mem['total'] / 1e6:,.1f} MB |" in table
    assert (tiny / "cmp" / "pareto.png").stat().st_size > 1000


@pytest.mark.skipif(not CRITEO.exists(), reason="../shared/data not present")
def test_real_criteo_sample_dlrm_full(tmp_path, capsys):
    from data.preprocess import preprocess

    preprocess(CRITEO, tmp_path / "p", mode="vocab", min_count=2, val_fraction=0.1, test_fraction=0.2, seed=0)
    spec = {"data": str(tmp_path / "p"), "method": "full", "dense_arch": [32, 16], "over_arch": [32, 1],
            "train": {"epochs": 4, "batch_size": 256, "patience": 2, "progress": False, "sparse_lr": 0.05}}
    s = run_training(spec, tmp_path / "run")
    print(f"real Criteo sample, DLRM full: test AUC {s['test']['auc']:.4f}")
    assert s["test"]["auc"] > 0.65


def test_comparison_without_full_has_no_baseline_columns(tmp_path):
    from rectables.compare import write_report

    row = {"method": "hash", "budget": 0.25, "rows": 10, "bytes": 640, "auc": 0.7, "logloss": 0.5, "samples_per_s": 1.0}
    write_report([row, {**row, "budget": 0.0625, "bytes": 160}], tmp_path)
    assert "| hash | 0.25 | 10 | 0.0 MB | - | 0.7000 | - |" in (tmp_path / "comparison.md").read_text()
    write_report([{**row, "method": "full", "budget": 1.0, "bytes": 1280, "auc": 0.72}, row], tmp_path)
    assert "| hash | 0.25 | 10 | 0.0 MB | 2.0x | 0.7000 | -0.0200 |" in (tmp_path / "comparison.md").read_text()
