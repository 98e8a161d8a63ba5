"""One contract, run against every registered method (a new method is tested for free)."""
import pytest
import torch

import rectables
from rectables.memory import real_bytes
from tests.helpers import (DEGENERATE, DIM, NUM_IDS, all_weights, collection, first_seen_order, random_kjt,
                           small_table, weights)

METHODS = rectables.list_tables()
FEATS = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_pooled_shapes(method, pooling):
    ebc = collection(method, FEATS, pooling=pooling)
    kt = ebc(random_kjt(FEATS, batch=5, max_len=3))
    assert kt.keys() == FEATS and kt.length_per_key() == [DIM] * 3
    assert kt.values().shape == (5, 3 * DIM) and kt.values().dtype == torch.float32
    assert torch.isfinite(kt.values()).all()


@pytest.mark.parametrize("method", METHODS)
def test_sequence_shapes(method):
    ec = collection(method, FEATS, pooled=False)
    kjt = random_kjt(FEATS, batch=4, max_len=3)
    out = ec(kjt)
    assert list(out) == FEATS
    for f in FEATS:
        jt = out[f]
        assert torch.equal(jt.lengths(), kjt[f].lengths())
        assert jt.values().shape == (int(kjt[f].lengths().sum()), DIM)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_update_touches_exactly_the_looked_up_rows(method, optimizer):
    ebc = collection(method, FEATS, optimizer=optimizer)
    kjt = random_kjt(FEATS, batch=6, max_len=2)
    w0 = all_weights(ebc)
    out = ebc(kjt).values()
    (out * torch.randn_like(out)).sum().backward()
    # rows the remap sent ids to, by physical table (read in eval mode: a dynamic table
    # would admit in a second training step what the first one left on its default row)
    ebc.eval()
    touched = {g: torch.zeros_like(w, dtype=torch.bool) for g, w in w0.items()}
    for i, t in enumerate(ebc.tables):
        st, base = ebc.table_storage(i)
        ids = kjt[t.feature_names[0]].values()
        (rows,) = t.remap(ids, [ids.numel()])
        for k_local, r in zip(t.feature_lanes(0), rows):
            k = base + k_local
            view = touched[ebc.groups[i]][st._w_off[k] : st._w_off[k] + st.shapes[k][0] * st.shapes[k][1]]
            view.view(st.shapes[k])[r] = True
    changed = torch.cat([(all_weights(ebc)[g] != w0[g]) for g in w0])
    touched = torch.cat([touched[g] for g in w0])
    assert changed.view(-1).any()
    assert not (changed.view(-1) & ~touched).any(), "an untouched row changed"
    assert changed.view(-1)[touched].float().mean() > 0.99, "a touched row did not change"


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_output(method):
    kjt = random_kjt(FEATS, batch=4, max_len=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(collection(method, FEATS)(kjt).values())
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_state_dict_round_trip(method, optimizer, tmp_path):
    kjt = random_kjt(FEATS, batch=4, max_len=3)
    a = collection(method, FEATS, optimizer=optimizer)
    a(kjt).values().sum().backward()  # non-trivial optimizer state
    torch.save({"model": a.state_dict(), "opt": a.optimizer_state_dict()}, tmp_path / "s.pt")
    torch.manual_seed(99)
    b = collection(method, FEATS, optimizer=optimizer)
    blob = torch.load(tmp_path / "s.pt")
    b.load_state_dict(blob["model"])
    b.load_optimizer_state_dict(blob["opt"])
    assert torch.equal(a(kjt).values(), b(kjt).values())
    for x, y in [(a, b)]:  # one more step from the same state gives the same weights
        x(kjt).values().sum().backward()
        y(kjt).values().sum().backward()
        assert torch.equal(weights(x), weights(y))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_memory_report_equals_real_bytes(method, device, optimizer):
    tables = [small_table(method, [f], name=f"t_{f}") for f in FEATS]
    ebc = rectables.EmbeddingBagCollection(tables, rectables.SparseOptimizer(optimizer), device)
    rep = rectables.memory_report(ebc)
    assert rep["total"] == real_bytes(ebc)
    for t in ebc.tables:
        shapes = t.physical_shapes()
        assert rep["tables"][t.name]["weights"] == 4 * sum(m * d for m, d in shapes)
        want_opt = 4 * sum(rectables.SparseOptimizer(optimizer).state_floats(m, d) for m, d in shapes)
        assert rep["tables"][t.name]["optimizer"] == want_opt


@pytest.mark.parametrize("method", METHODS)
def test_empty_bags_and_empty_batch(method):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ebc = collection(method, FEATS)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATS, values=torch.tensor([1, 2]), lengths=torch.tensor([0, 2, 0, 0, 0, 0])
    )
    out = ebc(kjt).values()
    assert out.shape == (2, 3 * DIM)
    assert (out[:, DIM:] == 0).all() and (out[0, :DIM] == 0).all() and (out[1, :DIM] != 0).any()
    empty = KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=torch.tensor([], dtype=torch.int64), lengths=torch.zeros(6, dtype=torch.int64))
    e = ebc(empty).values()
    assert e.shape == (2, 3 * DIM) and (e == 0).all()
    e.sum().backward()  # no rows, no update, no error


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one(method):
    ebc = collection(method, FEATS)
    assert ebc(random_kjt(FEATS, batch=1, max_len=4)).values().shape == (1, 3 * DIM)


@pytest.mark.parametrize("method", [m for m in METHODS if rectables.registry.table_class(m).raw_ids])
def test_raw_ids_near_int64_limits(method):
    ebc = collection(method, FEATS)
    kjt = random_kjt(FEATS, batch=3, max_len=3, high=2**63 - 1)
    extreme = torch.tensor([2**63 - 1, -(2**63), 2**63 - 2])
    kjt = type(kjt).from_lengths_sync(keys=FEATS, values=torch.cat([extreme, kjt.values()[3:]]), lengths=kjt.lengths())
    out = ebc(kjt).values()
    assert torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_setting_equals_full(method):
    assert method in DEGENERATE, f"method {method!r} needs a degenerate setting in tests/helpers.py"
    kjt = random_kjt(FEATS, batch=5, max_len=3)
    torch.manual_seed(0)
    full = rectables.EmbeddingBagCollection(
        [rectables.create_table("full", name=f"t_{f}", embedding_dim=DIM, feature_names=[f], num_ids=NUM_IDS) for f in FEATS],
        rectables.SparseOptimizer("sgd", lr=0.1),
    )
    other = rectables.EmbeddingBagCollection(
        [rectables.create_table(method, name=f"t_{f}", embedding_dim=DIM, feature_names=[f], **DEGENERATE[method]) for f in FEATS],
        rectables.SparseOptimizer("sgd", lr=0.1),
    )
    with torch.no_grad():
        for i in range(len(FEATS)):  # same starting rows in both
            st, base = other.table_storage(i)
            st.weight(base)[:NUM_IDS].copy_(full.storage.weight(i))
    full_kjt = first_seen_order(kjt) if method == "dynamic" else kjt
    for ebc, x in ((full, full_kjt), (other, kjt)):
        ebc(x).values().pow(2).sum().backward()
    assert torch.equal(full(full_kjt).values(), other(kjt).values())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["sum", "mean", "weighted", "sequence"])
def test_traced_and_scripted_lookup_equal_eager(method, kind):
    """fx (torchrec's tracer) and TorchScript run the same lookup as the fused path."""
    from torchrec.fx import symbolic_trace
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    tables = [small_table(method, [f], name=f"t_{f}", pooling="mean" if kind == "mean" else "sum") for f in FEATS]
    if kind == "sequence":
        module = rectables.EmbeddingCollection(tables)
    else:
        module = rectables.EmbeddingBagCollection(tables, is_weighted=kind == "weighted")
    kjts = [random_kjt(FEATS, batch=4, max_len=max_len) for max_len in (1, 3)]  # bags of one id (mult
    if kind == "weighted":                                                      # tables pool them) and longer
        kjts = [KeyedJaggedTensor.from_lengths_sync(keys=FEATS, values=k.values(), lengths=k.lengths(),
                                                    weights=torch.rand(k.values().numel())) for k in kjts]
    with torch.no_grad():  # training lookups first: a dynamic table admits ids (twice: min_count 2)
        for kjt in kjts + kjts:
            module(kjt)
    module.eval()  # inference paths, which read without admitting
    traced = symbolic_trace(module)
    scripted = torch.jit.script(module)
    for kjt in kjts:
        with torch.no_grad():
            want = module(kjt)
            for got in (traced(kjt), scripted(kjt)):
                if kind == "sequence":
                    for f in FEATS:
                        torch.testing.assert_close(got[f].values(), want[f].values(), rtol=1e-5, atol=1e-6)
                else:
                    torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_a_table_can_reset_its_rows(method, optimizer):
    """Table.reset_rows(k, rows): fresh values drawn as the table's init draws them, the
    rows' optimizer state zeroed, every other row and state untouched."""
    ebc = collection(method, FEATS, optimizer=optimizer)
    kjt = random_kjt(FEATS, batch=8, max_len=3)
    ebc(kjt).values().sum().backward()  # rows and optimizer state moved away from their init
    for i, t in enumerate(ebc.tables):
        st, base = ebc.table_storage(i)
        for k, (m, _) in enumerate(t.physical_shapes()):
            before = st.weight(base + k).clone()
            states = {n: v.clone() for n, v in st.optimizer_state(base + k).items()}
            rows = torch.arange(0, m, 2)
            t.reset_rows(k, rows)
            keep = torch.ones(m, dtype=torch.bool)
            keep[rows] = False
            after = st.weight(base + k)
            assert torch.equal(after[keep], before[keep])
            fresh = torch.empty_like(after[rows])
            torch.manual_seed(5)
            t.init_rows_(k, rows, fresh)
            torch.manual_seed(5)
            t.reset_rows(k, rows)
            assert torch.equal(st.weight(base + k)[rows], fresh)  # drawn as the init draws
            for n, v in st.optimizer_state(base + k).items():
                assert (v[rows] == 0).all() and torch.equal(v[keep], states[n][keep])
    with pytest.raises(RuntimeError, match="in no collection"):
        small_table(method, ["z"]).reset_rows(0, torch.tensor([0]))


def test_compositional_add_resets_rows_within_their_partitions_bounds():
    t = rectables.create_table("compositional", name="t", embedding_dim=8, feature_names=["a"], num_ids=10_000,
                               moduli=[10], combine="add")  # stacked tables of 10 and 1000 rows
    rectables.EmbeddingBagCollection([t])
    rows = torch.arange(t.physical_shapes()[0][0])
    out = torch.empty(len(rows), 8)
    t.init_rows_(0, rows, out)
    small, big = out[:10].abs().max(), out[10:].abs().max()
    assert t.init_bound(0) >= small > t.init_bound(1) >= big
