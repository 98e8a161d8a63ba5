"""SIGKILL at random points: a dataset is the old one or the new one, a run resumes to
the same result as an uninterrupted one."""
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data.preprocess import open_dataset, preprocess
from data.synth import synth
from rectables.experiment import run_training
from rectables.runs import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2, 3]


IMPORTS = ("import torchrec, models.dlrm, data.loader, data.preprocess, rectables.experiment\n"
           "from data.preprocess import preprocess\nfrom rectables.experiment import run_training\n")


def killed(code: str, delay: float | None) -> float:
    """Run ``code`` in a fresh interpreter; SIGKILL it ``delay`` s after it prints 'go'
    (imports done), or let it finish if it is quicker (or ``delay`` is None).  Returns
    the seconds from 'go' to its end."""
    p = subprocess.Popen([sys.executable, "-c", f"{IMPORTS}print('go', flush=True)\n{code}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "go"
    t0 = time.perf_counter()
    if delay is not None:
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=120) in (0, -signal.SIGKILL)
    return time.perf_counter() - t0


def when(seed: int, span: float) -> float:
    """A random moment in the seed's quarter of [0, span): the kills cover the whole run."""
    return span * (seed + random.Random(seed).random()) / len(SEEDS)


def metrics(summary: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "seconds")} for r in summary["history"]]


def fingerprint(d: Path) -> str:
    meta = open_dataset(d)
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "source"}, sort_keys=True).encode())
    for p in sorted(d.glob("*.npy")):
        h.update(p.name.encode() + np.load(p).tobytes())
    return h.hexdigest()


def test_killed_preprocess_leaves_the_old_dataset_or_the_new_one(tmp_path):
    sources = [tmp_path / "a.tsv", tmp_path / "b.tsv"]
    for i, src in enumerate(sources):
        synth(60_000, src, seed=i, scale=0.002)
    prints = []
    for i, src in enumerate(sources):
        preprocess(src, tmp_path / f"ref{i}", mode=("vocab", "raw")[i])
        prints.append(fingerprint(tmp_path / f"ref{i}"))
    t0 = time.perf_counter()
    preprocess(sources[0], tmp_path / "p", mode="vocab")
    took = time.perf_counter() - t0
    for seed in SEEDS:
        now = prints.index(fingerprint(tmp_path / "p"))
        other = 1 - now
        code = (f"preprocess({str(sources[other])!r}, {str(tmp_path / 'p')!r}, mode={('vocab', 'raw')[other]!r})")
        killed(code, when(seed, 1.3 * took))
        got = fingerprint(tmp_path / "p")  # loads, and is one of the two whole datasets
        assert got in prints
    preprocess(sources[0], tmp_path / "p", mode="vocab")  # cleans what the killed runs left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "b.tsv", "p", "ref0", "ref1"]


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    synth(4000, tmp_path / "d.tsv", seed=5, scale=0.0005)
    preprocess(tmp_path / "d.tsv", tmp_path / "p", min_count=2)
    spec = {"data": str(tmp_path / "p"), "method": "hash", "budget": 0.5, "dense_arch": [16, 16],
            "over_arch": [16, 1], "train": {"epochs": 3, "batch_size": 256, "patience": 3, "progress": False,
                                             "sparse_optimizer": "adam"}}
    took = killed(f"run_training({spec!r}, {str(tmp_path / 'whole')!r})", None)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    for seed in SEEDS:
        run = tmp_path / f"r{seed}"
        killed(f"run_training({spec!r}, {str(run)!r})",
               when(seed, took))
        if (run / "last.pt").exists():
            state = read_checkpoint(run / "last.pt")["state"]  # loads: never torn
            lines = (run / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(x)["epoch"] for x in lines][: state["epoch"]] == list(range(1, state["epoch"] + 1))
        resumed = run_training(spec, run, resume=True)
        assert resumed["test"] == whole["test"] and metrics(resumed) == metrics(whole)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2, 3]
        assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_fingerprint_tells_datasets_apart(tmp_path):
    synth(500, tmp_path / "a.tsv", seed=0, scale=0.001)
    preprocess(tmp_path / "a.tsv", tmp_path / "p")
    a = fingerprint(tmp_path / "p")
    preprocess(tmp_path / "a.tsv", tmp_path / "p", seed=1)
    assert fingerprint(tmp_path / "p") != a
