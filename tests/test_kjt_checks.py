"""Malformed KeyedJaggedTensors get a clear ValueError, for every method, pooled and not;
well-formed ones (int32 or int64, lengths or offsets) give the same result."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from tests.helpers import NUM_IDS, collection

METHODS = rectables.list_tables()
B = 3
COLLECTIONS = {(m, pooled): collection(m, ["a", "b"], pooled=pooled) for m in METHODS for pooled in (True, False)}


def reference(ebc, lengths, values):
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=values.long(), lengths=lengths)
    return _out(ebc(kjt))


def _out(result):
    return torch.cat([result[f].values() for f in ("a", "b")]) if isinstance(result, dict) else result.values()


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    pooled=st.booleans(),
    lengths=st.lists(st.integers(-2, 3), min_size=2 * B, max_size=2 * B),
    extra=st.integers(-2, 2),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64]),
    how=st.sampled_from(["lengths", "offsets", "both"]),
    nan=st.booleans(),
)
def test_malformed_kjt_is_rejected_and_good_ones_agree(method, pooled, lengths, extra, dtype, how, nan):
    ebc = COLLECTIONS[(method, pooled)]
    lengths_t = torch.tensor(lengths)
    n = max(int(lengths_t.sum()) + extra, 0)
    values = torch.randint(0, NUM_IDS, (n,), generator=torch.Generator().manual_seed(n)).to(dtype)
    if nan and dtype.is_floating_point and n:
        values[0] = float("nan")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths_t, 0)])
    kw = {"lengths": lengths_t} if how == "lengths" else {"offsets": offsets} if how == "offsets" else \
        {"lengths": lengths_t, "offsets": offsets}
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=values, stride=B, **kw)
    good = min(lengths) >= 0 and n == sum(lengths) and not dtype.is_floating_point
    if not good:
        with pytest.raises(ValueError, match="KeyedJaggedTensor"):
            ebc(kjt)
        return
    torch.testing.assert_close(_out(ebc(kjt)), reference(ebc, lengths_t, values), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_lengths_and_offsets_that_disagree_are_rejected(method):
    ebc = COLLECTIONS[(method, True)]
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), stride=2,
                            lengths=torch.tensor([1, 1, 1, 1]), offsets=torch.tensor([0, 2, 2, 3, 4]))
    with pytest.raises(ValueError, match="agree with its lengths"):
        ebc(kjt)
    with pytest.raises(ValueError, match="needs 4 lengths"):
        ebc(KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]), stride=2))


@pytest.mark.parametrize("method", METHODS)
def test_weighted_kjt_is_rejected_not_ignored(method):
    ebc = COLLECTIONS[(method, True)]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2]),
                                              lengths=torch.tensor([1, 1]), weights=torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="would ignore the KeyedJaggedTensor's per-id weights"):
        ebc(kjt)
