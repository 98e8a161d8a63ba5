"""The memory command on the Criteo Kaggle preset (meta device: allocates nothing)."""
import re

from rectables.cli import main


def test_memory_command_criteo(capsys):
    assert main(["memory", "--preset", "criteo-kaggle", "--dim", "16", "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "33,762,577 ids" in out
    full = re.search(r"\| full \| 1 \| 33,762,577 \| 2\.161 GB \| 0\.00 MB \| (\S+) GB", out)
    assert full, out
    for method in ("hash", "multihash"):
        rows = re.findall(rf"\| {method} \| 0\.25 \| ([\d,]+) \|.*\| ([\d.]+)x \|", out)
        assert rows and abs(float(rows[0][1]) - 4.0) < 0.1, out
