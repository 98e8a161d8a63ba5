"""The hash is part of every trained model: golden values are the spec."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rectables
from rectables import hashing

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def test_golden_keys():
    assert hashing.salt_key(0) == -2152535657050944081
    assert hashing.salt_key(1) == -7995527694508729151
    assert hashing.salt_key(0, 0) == 9206327630398885983
    assert hashing.salt_key(0, 1) == -6661253119320180677
    assert hashing.salt_key(7, 3, 2) == -8368627695570095976


def test_golden_mix():
    assert [hashing.mix64_int(x) for x in [0, 1, 2**63 - 1, 2**64 - 1]] == [
        0, 6238072747940578789, 6514504133438201533, 13029008266876403067,
    ]


def test_golden_buckets_torch_and_python():
    ids = [0, 1, 42, -1, 2**63 - 1, -(2**63)]
    golden = [205962, 886105, 840446, 526945, 30764, 217011]
    key = hashing.salt_key(0, 0)
    assert [hashing.bucket_int(x, key, 1000003) for x in ids] == golden
    assert hashing.bucket(torch.tensor(ids), key, 1000003).tolist() == golden


@settings(max_examples=200, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=20), INT64, st.integers(1, 2**40))
def test_torch_equals_python_reference(ids, key, m):
    got = hashing.bucket(torch.tensor(ids), key, m).tolist()
    assert got == [hashing.bucket_int(x, key, m) for x in ids]
    assert all(0 <= b < m for b in got)


def test_salts_differ_and_spread():
    keys = {hashing.salt_key(0, f, j) for f in range(26) for j in range(4)}
    assert len(keys) == 104
    b = hashing.bucket(torch.arange(100_000), hashing.salt_key(0), 100)
    counts = torch.bincount(b, minlength=100).float()
    assert counts.min() > 850 and counts.max() < 1150  # ~uniform: 1000 +- 5 sigma


@pytest.mark.parametrize("method, kw, chunks", [
    ("hash", {"num_buckets": 97}, [1, 1, 1]),
    ("multihash", {"num_buckets": 97, "num_hashes": 3}, [3, 3, 3]),
    ("unified", {"buckets_per_table": 97, "num_tables": 2, "num_chunks": [2, 1, 3], "dim_per_table": 4}, [2, 1, 3]),
])
def test_table_rows_are_bucket_of_id_with_salt_feature_and_hash(method, kw, chunks):
    """Hash j of feature f reads bucket(x, salt_key(seed, f, j), M): the spec, per element."""
    t = rectables.create_table(method, name="t", embedding_dim=12, feature_names=["a", "b", "c"], seed=5, **kw)
    counts = [4, 0, 3]
    values = torch.tensor([-3, 0, 2**62, 17, 5, -(2**63), 9])
    rows = t.remap(values, counts)
    M = next(iter(kw.values()))
    for f, (r, ids) in enumerate(zip(rows, values.split(counts))):
        assert r.shape == (chunks[f], counts[f])
        want = [[hashing.bucket_int(int(x), hashing.salt_key(5, f, j), M) for x in ids] for j in range(chunks[f])]
        assert r.tolist() == want
