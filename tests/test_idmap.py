"""The collisionless id -> row map against a Python dict."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rectables.idmap import IdMap, _kernels, pack


NATIVE = pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])


def test_the_compiled_kernels_are_built():
    assert IdMap(4).native, "rectables/_idmap.c was not built (pip install -e .)"


@NATIVE
def test_a_million_distinct_ids_get_distinct_rows(native):
    m = IdMap(1 << 20, native=native)
    gen = torch.Generator().manual_seed(0)
    ids = torch.unique(torch.randint(-(1 << 62), 1 << 62, (1_100_000,), generator=gen))[:1_000_000]
    ids = ids[torch.randperm(len(ids), generator=gen)]
    f = torch.randint(0, 26, (len(ids),), generator=gen)
    rows = torch.cat([m.insert(f[i : i + 100_000], ids[i : i + 100_000]) for i in range(0, len(ids), 100_000)])
    assert (rows >= 0).all() and torch.unique(rows).numel() == len(ids) == m.size  # no two keys on one row
    assert torch.equal(m.lookup(f, ids), rows)
    assert torch.equal(rows[:5], torch.arange(5))  # first seen, first row


@NATIVE
def test_same_id_in_two_features_is_two_keys_and_extremes_work(native):
    m = IdMap(8, native=native)
    big = torch.tensor([-(1 << 63), (1 << 63) - 1, 0, -1])
    rows = m.insert(torch.tensor([0, 0, 0, 0]), big)
    other = m.insert(torch.tensor([1, 1, 1, 1]), big)
    assert rows.tolist() == [0, 1, 2, 3] and other.tolist() == [4, 5, 6, 7]
    assert m.insert(torch.tensor([2]), torch.tensor([5])).tolist() == [-1]  # full: left out
    assert m.lookup(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])).tolist() == [2, 6, -1]


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.lists(st.tuples(st.integers(0, 3), st.integers(-50, 50)),
                                                      min_size=1, max_size=30)), min_size=1, max_size=12))
def test_matches_a_dict_under_inserts_and_removals(ops):
    for native in (True, False):
        _matches_a_dict(ops, native)


def _matches_a_dict(ops, native):
    m, ref, free = IdMap(16, native=native), {}, list(range(16))[::-1]
    for remove, keys in ops:
        f = torch.tensor([k[0] for k in keys])
        ids = torch.tensor([k[1] for k in keys])
        if remove:
            gone = sorted({ref[k] for k in keys if k in ref})
            if gone:
                m.remove_rows(torch.tensor(gone))
                for k in [k for k, r in ref.items() if r in gone]:
                    del ref[k]
                free += [r for r in gone][::-1]
            continue
        got = m.insert(f, ids).tolist()
        for k, r in zip(keys, got):
            if k not in ref and free:
                ref[k] = free.pop()
            assert r == ref.get(k, -1), (k, r, ref.get(k))
        assert m.size == len(ref)
        assert m.lookup(f, ids).tolist() == [ref.get(k, -1) for k in keys]


@pytest.mark.parametrize("writer,reader", [(True, False), (False, True), (True, True)])
def test_state_dict_round_trip_across_paths(writer, reader):
    a = IdMap(100, seed=3, native=writer)
    a.insert(torch.zeros(50, dtype=torch.int64), torch.arange(50) * 7919)
    a.remove_rows(torch.tensor([3, 4]))
    b = IdMap(100, seed=3, native=reader)
    b.load_state_dict(a.state_dict())
    probe = torch.arange(60) * 7919
    zeros = torch.zeros(60, dtype=torch.int64)
    assert torch.equal(a.lookup(zeros, probe), b.lookup(zeros, probe))
    assert torch.equal(a.insert(zeros, probe + 1), b.insert(zeros, probe + 1))


def _slots(C, gen, counts_hi=4, lasts=6):
    """A map's (id, meta, last, count) [C, 4] as select reads them: ~60% keys (unique rows),
    ~10% deleted, the rest empty; counts and last steps from small ranges, so most keys tie."""
    state = torch.rand(C, generator=gen)
    meta = torch.where(state < 0.6, torch.randperm(C, generator=gen), torch.where(state < 0.7, -2, -1))
    return torch.stack([torch.randint(0, 1 << 40, (C,), generator=gen), meta,
                        torch.randint(0, lasts, (C,), generator=gen), torch.randint(1, counts_hi, (C,), generator=gen)],
                       dim=1)


@pytest.mark.skipif(_kernels is None, reason="no compiler")
@pytest.mark.parametrize("lfu", [True, False])
@pytest.mark.parametrize("layout", ["uniform", "low_first", "high_first"])
@pytest.mark.parametrize("threads", [1, 3])
def test_select_gives_exactly_the_k_least_used_keys_of_a_large_map(lfu, layout, threads):
    """select's one-pass path (a bound read off the leading slots, its pass split over
    threads) and both of its fallbacks (the bound too low or too high for the rest) give
    the reference's set."""
    from rectables.idmap import SAMPLE
    from rectables.methods.dynamic import smallest

    gen = torch.Generator().manual_seed(1)
    C = 4 * SAMPLE
    slots = _slots(C, gen)
    if layout != "uniform":  # the sample's keys all below (or above) the rest's
        lead = slots[:SAMPLE, 2 + lfu]
        lead.copy_(torch.zeros_like(lead) if layout == "low_first" else torch.full_like(lead, 100))
    step = 5  # keys last read at step 5 are not candidates
    cand = ((slots[:, 1] >= 0) & (slots[:, 2] < step)).nonzero().squeeze(1)
    row = slots[cand, 1]
    keys = [slots[cand, 3], slots[cand, 2], row] if lfu else [slots[cand, 2], row]
    pairs = slots[:, :2].contiguous()  # the map's two buffers
    use = torch.where(slots[:, 1] >= 0, pack(slots[:, 3], slots[:, 2]), -1)
    for k in (1, 300, 5000, 60000, cand.numel(), cand.numel() + 7):
        out = torch.empty(k, dtype=torch.int64)
        n = _kernels.select(pairs.data_ptr(), use.data_ptr(), C, step, lfu, k, out.data_ptr(), threads)
        want = cand[smallest(keys, min(k, cand.numel()))]
        assert n == want.numel()
        assert torch.equal(out[:n].sort().values, want.sort().values), (layout, k)


@NATIVE
def test_a_large_map_rebuilds_once_deleted_keys_pass_a_quarter_of_its_slots(native):
    """The map keeps its count of deleted slots as keys come and go (inserts reuse deleted
    slots) instead of counting them: it rebuilds exactly when they pass a quarter of the
    slots, not before, and a loaded map counts them again."""
    from rectables.idmap import DELETED

    m = IdMap(1 << 17, native=native)
    C = m.slots.shape[0]

    def deleted():
        return int((m.slots[:, 1] == DELETED).sum())

    ids = torch.arange((1 << 17) - 3000) * 7919 + 3
    f = torch.zeros_like(ids)
    m.insert(f, ids)
    gen = torch.Generator().manual_seed(0)
    live = m.live()
    live = live[torch.randperm(live.numel(), generator=gen)]  # spread over the slots, as evictions are
    below = C // 4 - 1000
    m.remove(live[:below])
    m.insert(torch.zeros(3000, dtype=torch.int64), -torch.arange(1, 3001))  # some land on deleted slots
    assert 0 < below - deleted() < 3000 and int(m.tombs_) == deleted()
    copy = IdMap(1 << 17, native=native)
    copy.load_state_dict(m.state_dict())
    assert int(copy.tombs_) == deleted()
    gone = C // 4 - deleted()
    m.remove(live[below : below + gone])  # exactly at the limit: kept
    assert deleted() == C // 4
    m.remove(live[below + gone : below + gone + 1])  # past it: rebuilt, no tombstone left, every other key still found
    assert deleted() == 0 and int(m.tombs_) == 0
    assert int((m.lookup(f, ids) >= 0).sum()) == ids.numel() - (below + gone + 1)
    assert bool((m.lookup(torch.zeros(3000, dtype=torch.int64), -torch.arange(1, 3001)) >= 0).all())


@NATIVE
def test_a_map_saved_with_use_inside_its_slots_loads_with_the_same_keys_counts_and_steps(native):
    """Maps saved before ``use`` left the slots hold slots [C, 4] (id, meta, last, count):
    loading one gives the same keys, rows, counts and last steps, and the same next find."""
    from rectables.idmap import LOW32

    gen = torch.Generator().manual_seed(3)
    m = IdMap(300, native=native)
    for step in range(1, 6):
        ids = torch.randint(-40, 400, (64,), generator=gen)
        m.insert(ids % 3, ids, step=step)
        m.find(ids[:20], ids[:20] % 3, step=step)  # reads: counts above one
    m.remove(m.live()[:50])  # deleted slots too
    saved = m.state_dict()
    live = saved["slots"][:, 1] >= 0
    old = torch.stack([saved["slots"][:, 0], saved["slots"][:, 1],
                       torch.where(live, saved["use"] & LOW32, 0), torch.where(live, saved["use"] >> 32, 0)], dim=1)
    legacy = {k: v for k, v in saved.items() if k != "use"} | {"slots": old}
    back = IdMap(300, native=native)
    back.load_state_dict(legacy)
    assert torch.equal(back.slots, m.slots) and torch.equal(back.use, m.use)
    assert int(back.tombs_) == int(m.tombs_) == 50
    probe = torch.randint(-40, 400, (64,), generator=gen)
    (rows_a, new_a), (rows_b, new_b) = back.find(probe, probe % 3, step=6), m.find(probe, probe % 3, step=6)
    assert torch.equal(rows_a, rows_b) and torch.equal(new_a[:3], new_b[:3]) and torch.equal(back.use, m.use)


def test_counts_saturate_alike_on_both_paths():
    """A key's count stops at 2^31 - 1 (its use stays an int64 >= 0) in C and in torch."""
    from rectables.idmap import COUNT_MAX

    ids, f = torch.tensor([7, 7, 7, 9]), torch.zeros(4, dtype=torch.int64)
    maps = [IdMap(4, native=n) for n in (True, False)]
    for m in maps:
        m.insert(f[:1], ids[:1], step=1)
        m.use[m.live()] = pack(torch.tensor([COUNT_MAX - 1]), torch.tensor([1]))
        m.find(ids, f, step=2)
        assert int(m.count_of(m.live())[0]) == COUNT_MAX and int(m.last_of(m.live())[0]) == 2
    assert torch.equal(maps[0].use.sort().values, maps[1].use.sort().values)
