"""The memory command on the Criteo Kaggle preset (meta device: allocates nothing)."""
import re

from rectables.cli import main


def test_memory_command_criteo(capsys):
    assert main(["memory", "--preset", "criteo-kaggle", "--dim", "16", "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "33,762,577 ids" in out
    full = re.search(r"\| full \| 1 \| 33,762,577 \| 2\.161 GB \| 0\.00 MB \| 0\.00 MB \| (\S+) GB", out)
    assert full, out
    for method in ("hash", "multihash", "unified", "dynamic"):  # budgets on the bytes shown
        rows = re.findall(rf"\| {method} \| 1/4 \| ([\d,]+) \|.*\| ([\d.]+)x \|", out)
        assert rows and abs(float(rows[0][1]) - 4.0) < 0.1, out
    dyn = re.search(r"\| dynamic \| 1/4 \| [\d,]+ \| \S+ GB \| \S+ MB \| ([\d.]+) GB", out)
    assert dyn and float(dyn.group(1)) > 0.1, out  # its map is shown


def test_every_flag_has_a_description_and_shows_its_default(capsys):
    import argparse

    from rectables.cli import _parser

    p = _parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sp in [("rectables", p), *subs.items()]:
        for a in sp._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"{name} {a.option_strings or a.dest} has no description"
        text = sp.format_help()
        for a in sp._actions:
            if a.option_strings and not a.required and a.default not in (None, argparse.SUPPRESS) \
                    and not isinstance(a, argparse._HelpAction):
                assert f"(default: {a.default})" in " ".join(text.split()), (name, a.option_strings)
    train = subs["train"].format_help()
    assert "{sgd,adagrad,rowwise_adagrad,adam}" in train and "dynamic" in train  # choices are listed


def test_torch_fx_notice_does_not_reach_the_console():
    import subprocess
    import sys

    code = ("import torch, rectables\n"
            "from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as K\n"
            "e = rectables.EmbeddingBagCollection([rectables.create_table('hash', name='t', embedding_dim=4, "
            "feature_names=['a'], num_buckets=10)])\n"
            "e(K.from_lengths_sync(keys=['a'], values=torch.tensor([1]), lengths=torch.tensor([1])))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "is_fx_tracing" not in r.stderr, r.stderr


def test_dim_moves_the_dense_arch_with_it_or_names_the_flag(tmp_path, capsys):
    import argparse

    from rectables.specs import spec_of

    base = dict(data=str(tmp_path), model="dlrm", over_arch="64,1", epochs=1, batch_size=8, optimizer="sgd",
                sparse_lr=0.1, sparse_eps=1e-6, dense_lr=0.1, seed=0, max_steps=0, quiet=True, patience=1)
    from rectables.experiment import default_dense_arch

    got = spec_of(argparse.Namespace(**base, dim=32, dense_arch=None))
    assert got["dense_arch"] is None and got["train"]["sparse_eps"] == 1e-6  # resolved with the data; the flag taken
    assert default_dense_arch(32, {"features": ["C1"]}) == [64, 32]  # Criteo
    assert default_dense_arch(32, {"features": ["C1"], "schema": {"name": "a", "columns": ["y", "C1"], "label": "y",
                                                                   "sparse": ["C1"]}}) == [32]
    try:
        spec_of(argparse.Namespace(**base, dim=32, dense_arch="128,16"))
    except ValueError as e:
        assert "--dense-arch 128,32" in str(e)
    else:
        raise AssertionError("a dense arch that does not end at --dim was accepted")
