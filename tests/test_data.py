"""Parser, preprocessing, loader and generator on hand-written and generated data."""
import gzip

import numpy as np
import pytest

from data.criteo import MISSING_ID, CriteoFormatError, read_criteo
from data.loader import CriteoBatches
from data.preprocess import preprocess
from data.synth import synth

IDS = ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562",
       "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7",
       "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484", "e8b83407", "9727dd16"]
GOOD = "\t".join(["1", "1", "", "3", "-2"] + ["0"] * 9 + IDS)


def _write(tmp_path, lines, name="x.tsv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_parse_good_line(tmp_path):
    (ch,) = list(read_criteo(_write(tmp_path, [GOOD, GOOD.replace("1", "0", 1)])))
    assert ch.labels.tolist() == [1.0, 0.0]
    assert ch.dense[0, :4].tolist() == [1, 0, 3, -2]
    assert ch.sparse[0, 0] == 0x68FD1E64 and ch.sparse[0, 21] == MISSING_ID
    assert ch.sparse.dtype == np.int64 and (ch.sparse[0, :21] >= 0).all()


@pytest.mark.parametrize("bad, where", [
    (GOOD + "\textra", ":3: expected 40"),
    ("\t".join(GOOD.split("\t")[:30]), ":3: expected 40"),
    (GOOD.replace("68fd1e64", "68fd1e6z"), ":3: column C1: not 8 hex"),
    (GOOD.replace("68fd1e64", "68fd1e"), ":3: column C1: not 8 hex"),
    (GOOD.replace("\t3\t", "\t3.5\t", 1), ":3: column I3: not an integer"),
    (GOOD.replace("\t3\t", "\tabc\t", 1), ":3: column I3: not an integer"),
    ("2" + GOOD[1:], ":3: label"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, where):
    p = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(CriteoFormatError, match=str(p).replace(".", r"\.") + where):
        list(read_criteo(p))
    chunks = list(read_criteo(p, skip_bad_lines=True))
    assert sum(len(c.labels) for c in chunks) == 3 and sum(c.skipped for c in chunks) == 1


def test_error_line_counts_across_blocks(tmp_path):
    lines = [GOOD] * 40
    lines[22] = GOOD.replace("68fd1e64", "68fd1e6g")
    p = _write(tmp_path, lines)
    with pytest.raises(CriteoFormatError, match=r":23: column C1"):
        list(read_criteo(p, chunk_rows=5))  # blocks of ~4 lines: most parsed by the fast path
    chunks = list(read_criteo(p, chunk_rows=5, skip_bad_lines=True))
    assert sum(len(c.labels) for c in chunks) == 39 and sum(c.skipped for c in chunks) == 1
    assert [c.first_line for c in chunks] == sorted(c.first_line for c in chunks)


def test_unlabelled_file_reads_like_a_labelled_one(tmp_path):
    labelled = _write(tmp_path, [GOOD, GOOD.upper()], "l.tsv")
    unlabelled = _write(tmp_path, [GOOD.split("\t", 1)[1], GOOD.upper().split("\t", 1)[1]], "u.tsv")
    (a,), (b,) = list(read_criteo(labelled)), list(read_criteo(unlabelled, labelled=False))
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.sparse, b.sparse)
    assert b.labels.tolist() == [0.0, 0.0]
    with pytest.raises(CriteoFormatError, match=":1: expected 39"):
        list(read_criteo(labelled, labelled=False))


def test_truncated_gzip_is_an_error(tmp_path):
    p = tmp_path / "t.tsv.gz"
    blob = gzip.compress(("\n".join([GOOD] * 200) + "\n").encode())
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CriteoFormatError, match="truncated"):
        list(read_criteo(p))


def test_generator_is_deterministic(tmp_path):
    a = synth(3000, tmp_path / "a.tsv", seed=5, scale=0.001)
    b = synth(3000, tmp_path / "b.tsv.gz", seed=5, scale=0.001)
    synth(3000, tmp_path / "c.tsv", seed=6, scale=0.001)
    assert (tmp_path / "a.tsv").read_bytes() == gzip.decompress((tmp_path / "b.tsv.gz").read_bytes())
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()
    assert a["bayes_auc"] == b["bayes_auc"] and 0.7 < a["bayes_auc"] < 0.95
    assert 0.15 < a["positive_rate"] < 0.4


@pytest.mark.parametrize("mode", ["vocab", "raw"])
def test_round_trip_tsv_memmap_batches(tmp_path, mode):
    synth(2000, tmp_path / "d.tsv", seed=1, scale=0.001)
    meta = preprocess(tmp_path / "d.tsv", tmp_path / "p", mode=mode, min_count=2, seed=0)
    parsed = np.concatenate([c.sparse for c in read_criteo(tmp_path / "d.tsv")])
    assert meta["rows"] == 2000 and sum(meta["splits"].values()) == 2000
    loader = CriteoBatches(tmp_path / "p", "train", 256, shuffle=True, seed=0)
    seen = []
    for b in loader:
        B = len(b.labels)
        assert b.dense.shape == (B, 13) and b.sparse.stride() == B
        seen.append(b.sparse.values().view(26, B).T.numpy())
    seen = np.concatenate(seen)
    train = np.load(tmp_path / "p" / "split_train.npy")
    assert len(seen) == len(train)
    if mode == "raw":
        assert {tuple(r) for r in seen} == {tuple(r) for r in parsed[train]}
    else:  # ids seen >= 2 times in train keep an id, the rest map to OOV 0
        col = parsed[train, 2]
        vals, counts = np.unique(col, return_counts=True)
        assert meta["cardinalities"][2] == (counts >= 2).sum() + 1
        assert (seen[:, 2] < meta["cardinalities"][2]).all() and (seen[:, 2] == 0).sum() == (counts[counts < 2]).sum()


MOVIELENS = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"


@pytest.mark.skipif(not (MOVIELENS / "u.data").exists(), reason="../shared/data not present")
def test_movielens_features():
    from data.movielens import load_movielens

    ids, labels, cards = load_movielens(MOVIELENS)
    assert ids.shape == (100_000, 6) and cards[:3] == [1682, 943, 2] and cards[5] == 7
    assert (ids >= 0).all() and (ids < np.array(cards)).all()
    assert labels.mean() == pytest.approx((6110 + 11370) / 100_000 * -1 + 1)  # ratings 1-2 are negatives


def test_reader_works_in_a_forked_child_after_the_parent_used_it(tmp_path):
    import multiprocessing as mp

    p = _write(tmp_path, [GOOD] * 50)
    assert len(next(read_criteo(p)).labels) == 50  # the parent's decode threads exist now
    with mp.get_context("fork").Pool(1) as pool:
        rows = pool.apply_async(_count_rows, (str(p),)).get(timeout=60)
    assert rows == 50


def _count_rows(path: str) -> int:
    return sum(len(c.labels) for c in read_criteo(path))


def test_an_error_while_building_a_batch_reaches_the_consumer():
    from data.loader import prefetched

    def batches():
        yield 1
        raise ValueError("bad row 7")

    it = prefetched(batches())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad row 7"):
        next(it)
