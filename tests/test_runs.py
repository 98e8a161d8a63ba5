"""Datasets and run directories under bad input and faults: nothing silently wrong,
nothing lost, clear one-line errors."""
import json
import os
import stat

import numpy as np
import pytest

from data.criteo import CriteoFormatError
from data.preprocess import DatasetError, open_dataset, preprocess
from data.synth import synth
from rectables.cli import main
from rectables.experiment import run_training, score_file
from rectables.runs import RunError
from rectables.train import NonFiniteLoss
from tests.test_data import GOOD


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    synth(3000, d / "d.tsv", seed=3, scale=0.0005)
    preprocess(d / "d.tsv", d / "p", min_count=2)
    return d


def spec(d, **train):
    return {"data": str(d / "p"), "method": "hash", "budget": 0.5, "dense_arch": [16, 16], "over_arch": [16, 1],
            "train": {"epochs": 1, "batch_size": 512, "progress": False, **train}}


def snapshot(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


# ---- datasets ----------------------------------------------------------------------

def test_preprocess_refuses_a_directory_that_is_not_a_dataset(data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a dataset.*--overwrite"):
        preprocess(data / "d.tsv", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    preprocess(data / "d.tsv", tmp_path / "mine", overwrite=True)
    assert not (tmp_path / "mine" / "notes.txt").exists() and open_dataset(tmp_path / "mine")["rows"] == 3000


def test_replacing_a_dataset_leaves_no_stale_files(data, tmp_path):
    preprocess(data / "d.tsv", tmp_path / "p", mode="vocab")
    assert (tmp_path / "p" / "vocab_C1.npy").exists()
    preprocess(data / "d.tsv", tmp_path / "p", mode="raw")
    assert not list((tmp_path / "p").glob("vocab_*")) and open_dataset(tmp_path / "p")["mode"] == "raw"
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporaries left beside it


@pytest.mark.parametrize("lines", [[], ["garbage"] * 5, [GOOD] * 5])
def test_empty_or_too_small_inputs_are_refused(tmp_path, lines):
    (tmp_path / "x.tsv").write_text("".join(x + "\n" for x in lines))
    with pytest.raises(CriteoFormatError, match="too few"):
        preprocess(tmp_path / "x.tsv", tmp_path / "p", skip_bad_lines=True)
    assert not (tmp_path / "p").exists() and [p.name for p in tmp_path.iterdir()] == ["x.tsv"]


def test_open_dataset_finds_a_torn_array(data, tmp_path):
    preprocess(data / "d.tsv", tmp_path / "p")
    arr = tmp_path / "p" / "dense.npy"
    arr.write_bytes(arr.read_bytes()[:-52])
    with pytest.raises(DatasetError, match="dense.npy.*preprocess"):
        open_dataset(tmp_path / "p")
    with pytest.raises(DatasetError, match="not a preprocessed dataset"):
        open_dataset(tmp_path)


# ---- runs --------------------------------------------------------------------------

def test_existing_run_needs_resume_or_overwrite(data, tmp_path):
    run_training(spec(data), tmp_path / "r")
    before = snapshot(tmp_path / "r")
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        run_training(spec(data), tmp_path / "r")
    assert snapshot(tmp_path / "r") == before
    run_training(spec(data, seed=1), tmp_path / "r", overwrite=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["seed"] == 1


def test_resume_with_other_settings_lists_them_and_writes_nothing(data, tmp_path):
    run_training(spec(data), tmp_path / "r")
    before = snapshot(tmp_path / "r")
    other = {**spec(data, batch_size=256, epochs=2), "method": "multihash"}
    with pytest.raises(RunError, match=r"(?s)method: 'hash' -> 'multihash'.*train.batch_size: 512 -> 256"):
        run_training(other, tmp_path / "r", resume=True)
    assert snapshot(tmp_path / "r") == before
    s = run_training(spec(data, epochs=2), tmp_path / "r", resume=True)  # more epochs is fine
    assert s["epochs"] == 2


def test_eval_after_the_dataset_was_preprocessed_again_says_what_changed(data, tmp_path):
    preprocess(data / "d.tsv", tmp_path / "p")
    run_training({**spec(data), "data": str(tmp_path / "p")}, tmp_path / "r")
    assert score_file(tmp_path / "r", data / "d.tsv")["n"] == 3000
    preprocess(data / "d.tsv", tmp_path / "p", mode="raw")
    with pytest.raises(RunError, match="has changed.*mode: 'vocab' -> 'raw'"):
        score_file(tmp_path / "r", data / "d.tsv")


def test_non_finite_loss_stops_at_its_step_and_saves_nothing(data, tmp_path, capsys):
    bad = spec(data, sparse_lr=1e30, dense_lr=1e30, epochs=2)
    with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
        run_training(bad, tmp_path / "r")
    assert not (tmp_path / "r" / "best.pt").exists() and not (tmp_path / "r" / "last.pt").exists()
    args = ["train", "--data", str(data / "p"), "--method", "hash", "--budget", "1/2", "--dense-arch", "16,16",
            "--over-arch", "16,1", "--batch-size", "512", "--sparse-lr", "1e30", "--dense-lr", "1e30", "--quiet"]
    assert main([*args, "--run", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if not x.startswith("rectables: warning:")]  # few steps: warned
    assert len(errors) == 1 and errors[0].startswith("rectables: error: the loss is")


def test_single_class_validation_selects_by_logloss(tmp_path):
    lines = [GOOD.replace("1", "0", 1).replace("68fd1e64", f"{i % 50:08x}") for i in range(400)]
    (tmp_path / "x.tsv").write_text("".join(x + "\n" for x in lines))
    preprocess(tmp_path / "x.tsv", tmp_path / "p")
    with pytest.warns(RuntimeWarning, match="one class.*logloss"):
        s = run_training({**spec(tmp_path, epochs=2, patience=2), "data": str(tmp_path / "p")}, tmp_path / "r")
    assert s["selected_by"] == "val_logloss" and (tmp_path / "r" / "best.pt").exists()
    for name in ("summary.json", "metrics.jsonl"):
        text = (tmp_path / "r" / name).read_text()
        assert "NaN" not in text and "null" in text


@pytest.mark.parametrize("cut", [0, 0.5])
def test_torn_checkpoint_is_named(data, tmp_path, capsys, cut):
    run_training(spec(data), tmp_path / "r")
    ckpt = tmp_path / "r" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: int(ckpt.stat().st_size * cut)])
    with pytest.raises(RunError, match=r"last\.pt: cannot read this checkpoint.*truncated or corrupt"):
        run_training(spec(data, epochs=2), tmp_path / "r", resume=True)


def test_resume_drops_records_the_checkpoint_lacks_and_cleans_temporaries(data, tmp_path):
    run = tmp_path / "r"
    run_training(spec(data), run)
    epoch1 = (run / "last.pt").read_bytes()
    run_training(spec(data, epochs=2), run, resume=True)
    (run / "last.pt").write_bytes(epoch1)  # as if killed after metrics.jsonl, before last.pt was written
    (run / ".last.pt.tmp-abc123").write_bytes(b"x" * 100)
    run_training(spec(data, epochs=2), run, resume=True)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert not list(run.glob(".*"))
    mask = os.umask(0o022)
    os.umask(mask)
    for p in run.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_cli_errors_are_one_line_unless_debug(tmp_path, capsys):
    args = ["train", "--data", str(tmp_path / "nowhere"), "--run", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("rectables: error:") and "not a preprocessed dataset" in err and err.count("\n") == 1
    with pytest.raises(DatasetError):
        main(["--debug", *args])
    with pytest.raises(SystemExit) as e:
        main(["train", "--bogus"])
    assert e.value.code == 2


def test_loader_refuses_dataset_with_missing_split(data, tmp_path):
    from data.loader import CriteoBatches

    preprocess(data / "d.tsv", tmp_path / "p")
    np.save(tmp_path / "p" / "split_val.npy", np.arange(3))
    with pytest.raises(DatasetError, match="split_val"):
        CriteoBatches(tmp_path / "p", "train", 64)


def test_incompatible_method_is_refused_before_anything_is_written(data, tmp_path):
    from rectables.experiment import IncompatibleMethod

    with pytest.raises(IncompatibleMethod, match="baseline and has no budget"):
        run_training({**spec(data), "method": "full", "budget": 0.25}, tmp_path / "r")
    preprocess(data / "d.tsv", tmp_path / "raw", mode="raw")
    with pytest.raises(IncompatibleMethod, match="raw ids"):
        run_training({**spec(data), "data": str(tmp_path / "raw"), "method": "full", "budget": 1.0}, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_compositional_hashes_raw_ids_on_raw_data(data, tmp_path):
    preprocess(data / "d.tsv", tmp_path / "raw", mode="raw")
    s = run_training({**spec(data), "data": str(tmp_path / "raw"), "method": "compositional", "budget": 0.25},
                     tmp_path / "r")
    assert s["settings"]["hash_ids"] is True and s["test"]["auc"] > 0.5


def test_compare_reports_incompatible_methods_as_rows(data, tmp_path):
    from rectables.compare import compare

    preprocess(data / "d.tsv", tmp_path / "raw", mode="raw")
    compare({**spec(data), "data": str(tmp_path / "raw")}, ["full", "hash"], [0.5], tmp_path / "cmp")
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| hash | 1/2 |" in table and "| full | 1 | skipped: method 'full' needs ids in [0, n)" in table


def test_an_epoch_of_a_few_steps_is_warned_about_and_epochs_are_reported(data, tmp_path, capsys):
    s = spec(data, batch_size=4096, progress=True)
    with pytest.warns(RuntimeWarning, match=r"only 1 optimizer steps.*--batch-size"):
        run_training(s, tmp_path / "r")
    assert "epoch 1: train loss" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match=r"Use more --epochs \(e.g. \d+\)$"):  # a batch already small: no batch advice
        run_training(spec(data, batch_size=32, epochs=1, max_steps_per_epoch=3), tmp_path / "r2")


def test_by_default_rare_training_values_train_the_oov_row(data, tmp_path):
    meta = preprocess(data / "d.tsv", tmp_path / "p")
    assert meta["min_count"] == 2
    sparse = np.load(tmp_path / "p" / "sparse.npy")
    train = np.load(tmp_path / "p" / "split_train.npy")
    rare = [f for f, n in enumerate(meta["cardinalities"]) if n > 10]  # features with many values
    assert (sparse[train][:, rare] == meta["oov_id"]).any(axis=0).sum() >= len(rare) // 2  # OOV rows train
    preprocess(data / "d.tsv", tmp_path / "p1", min_count=1)
    assert not (np.load(tmp_path / "p1" / "sparse.npy")[train] == meta["oov_id"]).any()  # they would not


def test_sparse_eps_reaches_the_fused_optimizer_and_older_runs_resume_without_it(data, tmp_path):
    from data.preprocess import open_dataset
    from rectables.experiment import build_model
    from rectables.runs import _collections
    from rectables.train import TrainConfig

    model = build_model({**spec(data, sparse_eps=0.5), "dim": 16, "model": "dlrm"}, open_dataset(data / "p"))
    storages = [s for c in _collections(model).values() for s in c.storages.values()]
    assert storages and all(s.optimizer.eps == 0.5 and s.tbe.optimizer_args.eps == 0.5 for s in storages)
    with pytest.raises(ValueError, match="sparse_eps"):
        TrainConfig(sparse_eps=0.0)
    run_training(spec(data), tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["sparse_eps"] == 1e-8
    del cfg["train"]["sparse_eps"]  # as a run made before the setting existed resumes
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    assert run_training(spec(data, epochs=2), tmp_path / "r", resume=True)["epochs"] == 2
    with pytest.raises(RunError, match=r"train.sparse_eps: 1e-08 -> 0.001"):
        run_training(spec(data, epochs=3, sparse_eps=1e-3), tmp_path / "r", resume=True)
