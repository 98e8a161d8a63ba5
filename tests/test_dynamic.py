"""``dynamic``: collisionless rows, admission, eviction, row resets, eval, checkpoints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import rectables
from rectables.memory import memory_report
from rectables.methods.dynamic import DynamicTable

ROOT = Path(__file__).resolve().parents[1]


def kjt(a, b=()):
    """One bag per id: feature a's ids, then feature b's."""
    a, b = list(a), list(b)
    n = max(len(a), len(b), 1)
    lengths = [1] * len(a) + [0] * (n - len(a)) + [1] * len(b) + [0] * (n - len(b))
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor(a + b, dtype=torch.int64),
                                               lengths=torch.tensor(lengths))


def build(optimizer="sgd", **kw):
    t = DynamicTable("t", 4, ["a", "b"], **{"max_rows": 4, **kw})
    return t, rectables.EmbeddingBagCollection([t], rectables.SparseOptimizer(optimizer, lr=0.1))


def step(ebc, a, b=()):
    ebc(kjt(a, b)).values().sum().backward()


def resident(t, ids, feature=0):
    """The ids of ``feature`` that hold a row of their own."""
    f = torch.full((len(ids),), feature)
    return [i for i, r in zip(ids, t.map.lookup(f, torch.tensor(ids))) if r >= 0]


def test_a_million_ids_with_room_for_them_never_collide():
    t = DynamicTable("t", 4, ["a"], max_rows=1 << 20, eviction=None)
    gen = torch.Generator().manual_seed(0)
    ids = torch.unique(torch.randint(-(1 << 63), (1 << 63) - 1, (1_050_000,), generator=gen))[:1_000_000]
    ids = ids[torch.randperm(len(ids), generator=gen)]
    rows = torch.cat([t.remap(ids[i : i + 200_000], [200_000])[0][0] for i in range(0, len(ids), 200_000)])
    assert torch.unique(rows).numel() == 1_000_000 and int(rows.max()) < 1 << 20  # no default row, no sharing
    s = t.stats()
    assert s["collisions"] == 0 and s["admitted"] == s["occupied"] == 1_000_000 and s["rejected"] == 0


def test_the_same_id_in_two_features_is_two_keys():
    t, ebc = build()
    step(ebc, [7], [7])
    rows = t.map.lookup(torch.tensor([0, 1]), torch.tensor([7, 7]))
    assert rows.tolist() == [0, 1]


@pytest.mark.parametrize("policy,stream,kept", [
    # 4 rows; each step reads the ids listed; the last step needs 2 rows
    ("lru", [[1, 2, 3, 4], [1], [3], [2], [5, 6]], [2, 3, 5, 6]),  # 4, then 1, least recent
    ("lfu", [[1, 2, 3, 4], [1, 1], [3], [2, 2, 2], [4], [5, 6]], [1, 2, 5, 6]),  # 3 and 4 read twice, 4 later
    ("ttl", [[1, 2, 3, 4], [1], [2], [5, 6]], [1, 2, 5, 6]),  # 3 and 4 idle 3 steps > ttl 2
    (None, [[1, 2, 3, 4], [5, 6]], [1, 2, 3, 4]),  # no eviction: 5 and 6 read the default row
])
def test_eviction_order(policy, stream, kept):
    t, ebc = build(eviction=policy, ttl=2 if policy == "ttl" else None)
    for ids in stream:
        step(ebc, ids)
    assert resident(t, list(range(1, 7))) == kept
    assert t.stats()["evicted" if policy in ("lru", "lfu") else "expired"] == (0 if policy is None else 2)


def test_ttl_expires_idle_rows_every_n_steps_even_with_room():
    t, ebc = build(max_rows=8, eviction="ttl", ttl=1, evict_every=2)
    step(ebc, [1, 2])
    step(ebc, [1])
    assert resident(t, [1, 2]) == [1, 2]  # step 2 checks before reading: 2 idle 1 step, not > 1
    step(ebc, [1])
    assert resident(t, [1, 2]) == [1, 2]  # step 3: no check
    step(ebc, [1])
    assert resident(t, [1, 2]) == [1] and t.stats()["expired"] == 1  # step 4: 2 idle 3 steps


def test_expiry_then_policy_eviction_frees_exactly_what_is_still_missing():
    """Full-table eviction with a ttl: expired rows count, then LRU frees the rest (it once
    subtracted every free row, not only the expired ones, and left keys without rows)."""
    t, ebc = build(eviction="lru", ttl=2, evict_every=100)
    for ids in ([1], [2], [3]):  # one row still free
        step(ebc, ids)
    step(ebc, [5, 6, 7])  # 3 needed, 1 free; 1 expires (idle 3 > 2), LRU takes 2 (last read at step 2)
    assert resident(t, [1, 2, 3, 5, 6, 7]) == [3, 5, 6, 7]
    assert t.stats()["expired"] == 1 and t.stats()["evicted"] == 1 and t.stats()["rejected"] == 0


def test_eviction_never_takes_a_row_this_step_reads():
    t, ebc = build(eviction="lru")
    step(ebc, [1, 2, 3, 4])
    step(ebc, [1, 2, 3, 4, 5])  # full, every row read now: 5 waits on the default row
    assert resident(t, [1, 2, 3, 4, 5]) == [1, 2, 3, 4]
    assert t.stats()["rejected"] == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_an_evicted_row_starts_fresh(optimizer):
    t, ebc = build(optimizer, max_rows=2, eviction="lru")
    st, base = ebc.table_storage(0)
    for _ in range(3):
        step(ebc, [1, 2])  # rows 0 and 1 trained, optimizer state non-zero
    assert all((v[:2] != 0).any() for v in st.optimizer_state(base).values())
    step(ebc, [2])
    torch.manual_seed(0)  # the reset draws from its own generator, not this one
    with torch.no_grad():
        ebc(kjt([3]))  # 3 takes row 0, 1's
    fresh = torch.empty(1, 4)
    with torch.random.fork_rng():
        torch.manual_seed(t._reset_seed + 2 * 5 + 0)
        t.init_rows_(0, torch.tensor([0]), fresh)
    assert torch.equal(st.weight(base)[0], fresh[0])
    assert all((v[0] == 0).all() and (v[1] != 0).any() for v in st.optimizer_state(base).values())


def test_a_key_is_admitted_when_its_count_reaches_min_count():
    t, ebc = build(max_rows=8, min_count=3)
    step(ebc, [1, 1, 2])
    assert resident(t, [1, 2]) == []
    step(ebc, [1, 2])
    assert resident(t, [1, 2]) == [1]  # 1 seen 3 times, 2 twice
    assert t.stats()["rejected"] == 3 and t.stats()["admitted"] == 1  # (1, 2) then 2: per key and step
    assert t.sketch_estimate(torch.tensor([2])).tolist() == [2]


def test_sketch_never_undercounts_and_keeps_its_error_bound():
    t = DynamicTable("t", 4, ["a"], max_rows=16, min_count=10**6, sketch_width=512, sketch_depth=4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5000, (40_000,), generator=gen) ** 2  # 5000 keys, skewed counts
    for i in range(0, ids.numel(), 4000):
        t.remap(ids[i : i + 4000], [4000])
    keys, true = torch.unique(ids, return_counts=True)
    est = t.sketch_estimate(keys)
    assert (est >= true).all()
    eps, delta = torch.e / 512, torch.exp(torch.tensor(-4.0))
    assert ((est - true) > eps * ids.numel()).float().mean() <= delta


def test_probabilistic_admission_admits_about_p():
    t = DynamicTable("t", 4, ["a"], max_rows=50_000, admit_prob=0.25)
    t.remap(torch.arange(20_000), [20_000])
    assert abs(t.stats()["admitted"] / 20_000 - 0.25) < 0.02
    t2 = DynamicTable("t", 4, ["a"], max_rows=50_000, admit_prob=0.25)
    t2.remap(torch.arange(20_000), [20_000])
    assert t2.stats() == t.stats()  # seeded: runs repeat


def test_eval_mode_changes_nothing():
    t, ebc = build(max_rows=3, min_count=2, eviction="lfu")
    for ids in ([1, 1, 2], [3, 3, 4, 4], [5, 5, 1]):
        step(ebc, ids)
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    ebc.eval()
    out = ebc(kjt([1, 2, 3, 9, 9, 9, 5]))
    out.values().sum().backward()
    after = ebc.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [k for k in before if "weight" in k]  # only the rows the step trained; no map change
    rows = t.remap(torch.tensor([9, 1]), [2])[0][0].tolist()
    assert rows[0] == t.default_row


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_native_and_torch_paths_give_the_same_rows_and_stats(eviction):
    gen = torch.Generator().manual_seed(0)
    tables = []
    for native in (True, False):
        t, ebc = build(max_rows=8, min_count=2, admit_prob=0.7, eviction=eviction, ttl=5, evict_every=3)
        t.map.native = native
        tables.append((t, ebc))
    for _ in range(30):
        ids = (torch.randint(0, 30, (60,), generator=gen) ** 3).tolist()
        got = []
        for t, ebc in tables:
            with torch.no_grad():
                got.append(torch.cat(t.remap(torch.tensor(ids), [40, 20]), dim=1))
        assert torch.equal(got[0], got[1])
    assert tables[0][0].stats() == tables[1][0].stats() and tables[0][0].stats()["evicted"] > 0
    assert torch.equal(tables[0][0].sketch, tables[1][0].sketch)


def test_budget_counts_map_and_sketch():
    for n, frac in ((10_000, 0.25), (10_000, 1 / 16), (500, 1.0)):
        t = DynamicTable.for_budget("t", 16, ["a"], n, frac)
        ebc = rectables.EmbeddingBagCollection([t])
        rep = memory_report(ebc)["tables"]["t"]
        assert rep["weights"] + rep["buffers"] == DynamicTable.table_bytes(t.max_rows, 16, t.min_count)
        assert rep["weights"] + rep["buffers"] <= frac * 4 * 16 * n
        assert rep["buffers"] > 0.4 * rep["weights"]  # the map is most of what is not weights
        assert (t.min_count > 1) == (t.max_rows < n)


def test_checkpoint_round_trip_in_a_new_process(tmp_path):
    t, ebc = build("adam", max_rows=6, min_count=2, eviction="lru", ttl=4, evict_every=2)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 10, (12,), generator=gen).tolist() for _ in range(12)]
    for ids in batches[:10]:
        step(ebc, ids[:8], ids[8:])
    torch.save({"model": ebc.state_dict(), "opt": ebc.optimizer_state_dict()}, tmp_path / "ck.pt")
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from tests.test_dynamic import build, kjt, step
t, ebc = build("adam", max_rows=6, min_count=2, eviction="lru", ttl=4, evict_every=2)
blob = torch.load({str(tmp_path / "ck.pt")!r})
ebc.load_state_dict(blob["model"]); ebc.load_optimizer_state_dict(blob["opt"])
ids = {batches[10]!r}
out = ebc(kjt(ids[:8], ids[8:])).values()
out.sum().backward()
step(ebc, {batches[11][:8]!r}, {batches[11][8:]!r})
json.dump({{"out": out.tolist(), "stats": t.stats(), "w": ebc.storage.weight(0).tolist()}}, sys.stdout)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    got = json.loads(proc.stdout)
    out = ebc(kjt(batches[10][:8], batches[10][8:])).values()
    out.sum().backward()
    step(ebc, batches[11][:8], batches[11][8:])
    assert got["out"] == out.tolist() and got["stats"] == t.stats()
    assert got["w"] == ebc.storage.weight(0).tolist() and t.stats()["evicted"] + t.stats()["expired"] > 0


def test_bad_settings_are_refused_by_name():
    for kw, word in (({"eviction": "fifo"}, "eviction"), ({"eviction": "ttl"}, "ttl"), ({"admit_prob": 0}, "admit_prob"),
                     ({"sketch_width": 64}, "sketch_width"), ({"max_rows": 0}, "max_rows")):
        with pytest.raises(ValueError, match=word):
            DynamicTable("t", 4, ["a"], **{"max_rows": 4, **kw})


def test_tables_remapped_together_on_threads_end_as_one_at_a_time():
    """A collection remaps all its dynamic tables in one native call spread over threads
    (each table on one thread): rows, maps, sketches, counters and evictions must be those
    of remapping the tables one after another."""
    def run(threads):
        torch.manual_seed(0)
        tables = [DynamicTable(f"t{i}", 4, [f"f{i}"], max_rows=50 + 40 * i, min_count=2, eviction=pol, seed=i)
                  for i, pol in enumerate(["lfu", "lru", "lfu", "lru", "lfu"])]
        ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer("rowwise_adagrad", lr=0.1))
        gen, old, rows = torch.Generator().manual_seed(1), torch.get_num_threads(), []
        torch.set_num_threads(max(threads, 1))
        try:
            for _ in range(30):
                ids = [torch.randint(0, 400, (300,), generator=gen) for _ in tables]
                if threads:
                    rows.append(DynamicTable.remap_many(tables, ids, [[300]] * len(tables)))
                else:  # one table at a time
                    rows.append([t.remap(x, [300]) for t, x in zip(tables, ids)])
        finally:
            torch.set_num_threads(old)
        return rows, ebc.state_dict(), [t.stats() for t in tables]

    (r1, s1, st1), (r3, s3, st3) = run(0), run(3)
    assert sum(s["evicted"] for s in st1) > 0 and st1 == st3
    assert all(torch.equal(a[0], b[0]) for x, y in zip(r1, r3) for a, b in zip(x, y))
    assert s1.keys() == s3.keys() and all(torch.equal(s1[k], s3[k]) for k in s1)


def test_a_copied_table_trains_its_own_buffers_not_the_original_s():
    """A deep copy (as model averaging, or a best-so-far snapshot, makes one) keeps no
    address of the original's buffers: training the copy leaves the original unchanged."""
    import copy

    t, ebc = build(max_rows=16)
    step(ebc, [1, 2, 3])  # the native path has run once
    twin = copy.deepcopy(ebc)
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    for _ in range(3):
        step(twin, [4, 5, 6, 7], [8, 9])
    assert all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())
    assert twin.tables[0].stats()["occupied"] == 9 and t.stats()["occupied"] == 3


def test_a_table_past_the_steps_it_can_record_says_so():
    """A key's last step is kept in 32 bits: the step after the last one it can record is
    refused, naming the table, instead of ordering keys wrongly."""
    from rectables.idmap import MAX_STEP

    t, ebc = build()
    step(ebc, [1, 2])
    t.step.fill_(MAX_STEP - 1)
    step(ebc, [1, 3])  # the last one it can record
    with pytest.raises(RuntimeError, match="'t'.*at most"):
        step(ebc, [1])
    ebc.eval()
    ebc(kjt([1, 3]))  # evaluation counts no step
