"""The plan shared by the collections (``rectables/embedding_modules.py``): tables, their
lanes, one fused storage per group, the rows shown under torchrec's names, the lookup.

``EmbeddingBagCollection(KeyedJaggedTensor) -> KeyedTensor`` (pooled, sum or mean) and
``EmbeddingCollection(KeyedJaggedTensor) -> dict[str, JaggedTensor]`` (one row per id),
so code written for torchrec's EBC / EC switches by changing one constructor.

Each feature's ids are remapped to K_f lanes; every lane is one TBE feature.  Lanes are
ordered feature by feature (so ``concat`` costs nothing), or lane by lane in a group
whose features all sum or multiply K lanes alike (the reduce then runs over contiguous
[B, F * d] blocks).  A pooled feature that sums K lanes of one physical table (``multihash``,
stacked ``compositional`` add) is one lane whose bags hold the K rows of every id: the
TBE's own pooling does the sum.  ``mult`` tables of a pooled collection need per-id products: when
no bag of theirs holds more than one id (Criteo-style inputs) their lanes are pooled as
the KJT's own bags; otherwise every id is a bag of its own in the per-id storage group,
each lane with B' = max ids per lane bags, padded empty.  Sequence
output (EmbeddingCollection) always uses one bag per id.

Shapes: B batch, F features, N ids, K lanes, D dim, M rows.

Example::

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"], values=torch.tensor([3, 7, 7, 1]),
        lengths=torch.tensor([1, 1, 2, 0]))        # B = 2: user=[3],[7]; item=[7,1],[]
    ebc = EmbeddingBagCollection([create_table("full", name="t", embedding_dim=8,
                                  feature_names=["user", "item"], num_ids=10)])
    ebc(kjt).values().shape                        # [2, 16]
"""
from __future__ import annotations

import functools
import typing

import torch
from torch import nn

from rectables.compat import check_kjt, config_of, is_config, tables_from_configs
from rectables.lanes import group_of, one_id_per_bag, one_table_sum, uniform_reduce
from rectables.optim import SparseOptimizer
from rectables.storage import FusedStorage
from rectables.table import Table


class _Rows(nn.Module):
    """A table's rows as torchrec shows them: ``weight`` [M, D], or ``weight_<k>`` per
    physical table when the method has several; views into the fused storage.  The fused
    optimizer updates them inside backward, so they never get a ``.grad``, and a torch
    optimizer given them (``model.parameters()``) leaves them alone."""

    def __init__(self, views: list[torch.Tensor]) -> None:
        super().__init__()
        for k, v in enumerate(views):
            self.register_parameter("weight" if len(views) == 1 else f"weight_{k}", nn.Parameter(v))


class _Collection(nn.Module):
    """Plan shared by the pooled and sequence collections."""

    pooled = True
    _rows_name = "embedding_bags"  # torchrec's attribute (and state_dict prefix) for the rows

    def __init__(
        self,
        tables: list[Table],
        optimizer: SparseOptimizer | None = None,
        device: str | torch.device | None = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        if tables and all(is_config(c) for c in tables):  # torchrec's constructor: configs, every table full
            tables = tables_from_configs(tables)
        names = [t.name for t in tables]
        feats = [f for t in tables for f in t.feature_names]
        if len(set(names)) != len(names) or any(len(set(t.feature_names)) != len(t.feature_names) for t in tables):
            raise ValueError(f"need unique table names, and no feature twice in one table; "
                             f"got {names}, {[t.feature_names for t in tables]}")
        self.tables = nn.ModuleList(tables)
        self._is_weighted = bool(is_weighted)
        self._anchor = torch.zeros(0, requires_grad=True)  # makes autograd call the compiled lookup's backward
        _annotate(type(self))
        #: the KJT key each output reads (a feature served by several tables appears once per table)
        self.feature_names = feats
        #: output keys, torchrec's naming: the feature, or ``feature@table`` when several tables serve it
        self.output_names = [f if feats.count(f) == 1 else f"{f}@{t.name}" for t in tables for f in t.feature_names]
        self.dims = [d for t in tables for d in t.feature_dims()]
        #: (table, its own feature index) of each feature
        self._feature_table = [(t, i) for t in tables for i in range(len(t.feature_names))]
        # storage groups: "bags" pooled by the TBE; "rows" one row per id (sequence output,
        # and mult tables, which sum products per bag).  A pooled table whose K summed lanes
        # all read one physical table is looked up as one lane whose bags hold all K rows
        # of each id (``_merged``).
        self.groups = [group_of(t, self.pooled) for t in tables]
        self._merged = [self.pooled and one_table_sum(t) for t in tables]
        shapes: dict[str, list] = {"bags": [], "rows": []}
        feature_lanes: dict[str, list] = {g: [] for g in shapes}  # per feature: global tables of its lanes
        self._base: list[int] = []
        self._lane_dims: list[list[list[int]]] = []  # [table][feature] -> dims of its lanes
        for t, g, merged in zip(tables, self.groups, self._merged):
            base = len(shapes[g])
            self._base.append(base)
            shapes[g] += t.physical_shapes()
            per_f = [t.feature_lanes(f)[: 1 if merged else None] for f in range(len(t.feature_names))]
            feature_lanes[g] += [[base + k for k in ks] for ks in per_f]
            self._lane_dims.append([[shapes[g][base + k][1] for k in ks] for ks in per_f])
        per_feature = [(g, (t.combine, d)) for t, g, dims in zip(tables, self.groups, self._lane_dims) for d in dims]
        # width of each feature's combined lanes (its dim, unless the table transforms it)
        self._widths = [sum(d) if c == "concat" else d[0] for _, (c, d) in per_feature]
        self._transforms = any(t.transforms for t in tables)
        used = [g for g in shapes if shapes[g]]
        self._group_features = {g: [f for f, (gf, _) in enumerate(per_feature) if gf == g] for g in used}
        self._group_combines = {g: [per_feature[f][1] for f in fs] for g, fs in self._group_features.items()}
        # runs of consecutive per-id features whose tables share a class: one transform_many
        # each where bags hold one id (None: no transform)
        self._runs: list[tuple] = []
        for f in self._group_features.get("rows", []):
            t = self._feature_table[f][0]
            kind = type(t) if t.transforms else None
            if not self._runs or self._runs[-1][0] is not kind:
                self._runs.append((kind, [], []))
            self._runs[-1][1].append(self._feature_table[f])
            self._runs[-1][2].append(self._widths[f])
        # a group whose features all reduce their K > 1 lanes alike is laid out lane by lane
        # ([B, K, F_g * d] output: the reduce runs over contiguous blocks); others feature by feature
        self._lane_major = {g: uniform_reduce(c) for g, c in self._group_combines.items()}
        lanes = {g: ([fl[f][k] for k in range(len(fl[0])) for f in range(len(fl))] if self._lane_major.get(g)
                     else [k for f in fl for k in f]) for g, fl in feature_lanes.items()}
        opt = optimizer or SparseOptimizer()
        dtypes = {g: {t.dtype for t, tg in zip(tables, self.groups) if tg == g} for g in shapes}
        if any(len(d) > 1 for d in dtypes.values()):
            raise ValueError(f"the tables of one storage must share a data_type (one fused TBE, one precision); "
                             f"got {[(t.name, str(t.dtype)) for t in tables]}")
        device = torch.device(device) if device is not None else torch.get_default_device()
        self._device = device
        self.storages = nn.ModuleDict({g: FusedStorage(shapes[g], lanes[g], opt, device=device, dtype=dtypes[g].pop())
                                       for g in shapes if shapes[g]})
        rows = {t.name: _Rows([self.storages[g].weight(b + k) for k in range(len(t.physical_shapes()))])
                for t, g, b in zip(tables, self.groups, self._base)}
        for i, t in enumerate(tables):
            t._reset = functools.partial(self._reset_rows, i)
        self.add_module(self._rows_name, nn.ModuleDict(rows))
        # the random numbers torchrec draws: its EBC builds every nn.EmbeddingBag (N(0, 1) rows)
        # before its init_fns; its EC builds and inits table by table
        if self.pooled:
            for t in tables:
                _torchrec_draws(t, self.device)
        self._init_tables(draws=not self.pooled)
        self._all_passthrough = self.pooled and all(t.passthrough for t in tables)
        self._one_lane = not any(self._merged) and all(len(d) == 1 for dims in self._lane_dims for d in dims)
        self._rows_features = torch.tensor(self._group_features.get("rows", []), dtype=torch.int64)
        self._first = [0]  # index of each table's first feature
        self._by_class: dict[type, list[int]] = {}  # the tables of each class, remapped in one call
        for i, t in enumerate(tables):
            self._first.append(self._first[-1] + len(t.feature_names))
            self._by_class.setdefault(type(t), []).append(i)
        self._limits = torch.tensor([t.physical_shapes()[0][0] for t in tables])

    def reset_parameters(self) -> None:
        """Initialise every physical table (the table's ``init_fn`` or its method's init, drawn
        into a contiguous [M_k, D_k] tensor: the same random numbers as torchrec's tables) and
        zero the optimizer state."""
        self._init_tables(draws=False)

    @torch.no_grad()
    def _init_tables(self, draws: bool) -> None:
        for t, g, base in zip(self.tables, self.groups, self._base):
            if draws:
                _torchrec_draws(t, self.device)
            st = self.storages[g]
            for k in range(len(t.physical_shapes())):
                w = st.weight(base + k)
                if w.device.type == "meta":
                    continue
                fresh = w if w.is_contiguous() else torch.empty(w.shape, dtype=w.dtype)  # padded rows: drawn apart
                t.init_fn(fresh) if t.init_fn is not None else t.init_weight_(k, fresh)
                if fresh is not w:
                    w.copy_(fresh)
                for state in st.optimizer_state(base + k).values():
                    state.zero_()

    def _configs(self) -> list:
        return [config_of(t, self.pooled) for t in self.tables]

    def __prepare_scriptable__(self):
        """torch.jit.script compiles the straight-line lookup (inference: no fused update)."""
        from torchrec.fx import symbolic_trace

        return symbolic_trace(self)

    @torch.no_grad()
    def _reset_rows(self, i: int, k: int, rows: torch.Tensor, seed: int | None = None) -> None:
        """Table i's request: fresh values for rows [R] of its physical table k, state zeroed."""
        t, (st, base) = self.tables[i], self.table_storage(i)
        rows = rows.to(torch.int64)
        fresh = torch.empty(len(rows), t.physical_shapes()[k][1])
        if seed is None:
            t.init_rows_(k, rows, fresh)
        else:
            with torch.random.fork_rng(devices=[]):  # the CPU generator only (torch.manual_seed
                torch.default_generator.manual_seed(seed)  # also visits every device: 1.2 ms a call)
                t.init_rows_(k, rows, fresh)
        st.reset_rows(base + k, rows, fresh)

    def row_parameters(self) -> list[nn.Parameter]:
        """The rows of every table (updated by the fused optimizer, not a torch one)."""
        return list(getattr(self, self._rows_name).parameters())

    def table_weights(self, name: str) -> list[torch.Tensor]:
        """The physical tables [M_k, D_k] of the table called ``name``: views into the fused
        storage (``weight``, or ``weight_<k>``, as torchrec shows them)."""
        return list(getattr(self, self._rows_name)[name].parameters())

    def optimizer_state_dict(self) -> dict[str, torch.Tensor]:
        """The fused optimizer's state, apart from ``state_dict()`` (which holds the rows
        under torchrec's keys): save both to resume training exactly."""
        return {f"{g}.{k}": v for g, st in self.storages.items() for k, v in st.optimizer_state_dict().items()}

    def load_optimizer_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for g, st in self.storages.items():
            st.load_optimizer_state_dict({k[len(g) + 1 :]: v for k, v in state.items() if k.startswith(g + ".")})

    @property
    def device(self) -> torch.device:
        return self._device

    def table_storage(self, i: int) -> tuple[FusedStorage, int]:
        """(storage, index of its first physical table) of the i-th table."""
        return self.storages[self.groups[i]], self._base[i]

    @property
    def storage(self) -> FusedStorage:
        """The storage, when the collection has one group only."""
        if len(self.storages) != 1:
            raise AttributeError(f"this collection has {len(self.storages)} storages; use table_storage(i)")
        return next(iter(self.storages.values()))

    @classmethod
    def from_configs(
        cls,
        configs: list,
        methods: dict[str, str | tuple[str, dict]] | None = None,
        optimizer: SparseOptimizer | None = None,
        device: str | torch.device | None = None,
        is_weighted: bool = False,
    ):
        """Build from torchrec ``EmbeddingBagConfig`` / ``EmbeddingConfig`` objects.

        ``methods`` maps a table name to a method, or to ``(method, options)``; tables
        not named are ``full``.  torchrec's ``num_embeddings`` fills the method's size
        argument (``num_ids``, ``num_buckets``) unless the options give it.
        """
        weighted = {"is_weighted": True} if is_weighted else {}  # EmbeddingCollection has no such argument
        return cls(tables_from_configs(configs, methods), optimizer, device, **weighted)

    def is_weighted(self) -> bool:
        """True if lookups take per-id weights (torchrec's ``is_weighted``)."""
        return self._is_weighted

    # ---- lookup --------------------------------------------------------------------
    def _align(self, kjt):
        keys = kjt.keys()
        if keys == self.feature_names:
            return kjt
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise ValueError(f"KeyedJaggedTensor lacks feature(s) {missing}; it has {keys}")
        return kjt.permute([keys.index(f) for f in self.feature_names])

    def _lookup(self, kjt):
        """Remap every table and run the fused lookups.

        Returns (kjt, {group: output}, ids per feature, whether the per-id group was
        looked up as the KJT's bags, output [B, *], rather than one bag per id).
        """
        check_kjt(kjt, self._is_weighted)
        kjt = self._align(kjt)
        B = kjt.stride()
        values, lengths, offsets = kjt.values(), kjt.lengths(), kjt.offsets()
        weights = kjt.weights() if self._is_weighted else None
        if values.dtype != torch.int64:
            values, offsets = values.long(), offsets.long()
        bounds = offsets[::B].tolist() if B else [0] * (len(self.feature_names) + 1)
        counts = [bounds[i + 1] - bounds[i] for i in range(len(self.feature_names))]
        if self._all_passthrough:
            self._check_ids(values, bounds)
            return kjt, {"bags": self.storage(values, offsets, weights)}, counts, False
        # per group, per slot (lane k when lane-major, else one slot): ids, bag lengths, id
        # counts, per-id weights (the per-id group is weighted after its combine, in forward)
        parts: dict[str, list] = {g: [[] for _ in range(self._slots(g))] for g in self.storages}
        lens: dict[str, list] = {g: [[] for _ in range(self._slots(g))] for g in self.storages}
        lane_ids: dict[str, list] = {g: [[] for _ in range(self._slots(g))] for g in self.storages}
        wparts: dict[str, list] = {g: [[] for _ in range(self._slots(g))] for g in self.storages}
        remapped = [None] * len(self.tables)
        for cls, idx in self._by_class.items():
            f0 = [self._first[i] for i in idx]
            f1 = [self._first[i + 1] for i in idx]
            got = cls.remap_many([self.tables[i] for i in idx], [values[bounds[a] : bounds[b]] for a, b in zip(f0, f1)],
                                 [counts[a:b] for a, b in zip(f0, f1)])
            for i, rows in zip(idx, got):
                remapped[i] = rows
        for t, g, f0, merged, rows in zip(self.tables, self.groups, self._first, self._merged, remapped):
            for i, r in enumerate(rows):
                seg = lengths[(f0 + i) * B : (f0 + i + 1) * B]
                w = weights[bounds[f0 + i] : bounds[f0 + i + 1]] if weights is not None and g == "bags" else None
                if merged and r.shape[0] > 1:  # the K rows of each id side by side, bags K times longer
                    seg, w = seg * r.shape[0], None if w is None else w.repeat_interleave(r.shape[0])
                    r = r.t().reshape(1, -1)
                for k in range(r.shape[0]):
                    slot = k if self._lane_major[g] else 0
                    parts[g][slot].append(r[k])
                    lens[g][slot].append(seg)
                    lane_ids[g][slot].append(r.shape[1])
                    wparts[g][slot].append(w)
        parts = {g: [x for slot in p for x in slot] for g, p in parts.items()}
        lens = {g: [x for slot in p for x in slot] for g, p in lens.items()}
        lane_ids = {g: [x for slot in p for x in slot] for g, p in lane_ids.items()}
        wparts = {g: [x for slot in p for x in slot] for g, p in wparts.items()}
        out = {}
        rows_as_bags = "rows" in self.storages and self._rows_pooled(lengths, B)
        for g, storage in self.storages.items():
            indices = torch.cat(parts[g]) if len(parts[g]) > 1 else parts[g][0]
            if g == "rows" and not rows_as_bags:
                tbe_offsets = one_id_per_bag(lane_ids[g])
            elif self._one_lane and len(self.storages) == 1:  # bags unchanged: reuse the KJT offsets
                tbe_offsets = offsets
            else:
                lens_all = torch.cat(lens[g]) if len(lens[g]) > 1 else lens[g][0]
                tbe_offsets = torch.zeros(lens_all.numel() + 1, dtype=torch.int64)
                torch.cumsum(lens_all, 0, out=tbe_offsets[1:])
            w = None if weights is None or g == "rows" else (torch.cat(wparts[g]) if len(wparts[g]) > 1 else wparts[g][0])
            out[g] = storage(indices, tbe_offsets, w)
        return kjt, out, counts, rows_as_bags

    def _slots(self, g: str) -> int:
        return len(self._group_combines[g][0][1]) if self._lane_major[g] else 1

    def _rows_pooled(self, lengths: torch.Tensor, B: int) -> bool:
        """True if the per-id group can be looked up as the KJT's own bags: pooled output,
        unweighted (weights scale each id's product, per id), and no bag of a per-id
        feature holds more than one id (then a bag's product of lanes is its id's
        product, and an empty bag is 0 either way).  One host sync."""
        if not self.pooled or self._is_weighted or B == 0:
            return self.pooled and not self._is_weighted
        return int(lengths.view(-1, B).index_select(0, self._rows_features).max()) <= 1

    def _transform(self, f: int, vectors: torch.Tensor, bags: torch.Tensor, batch: int) -> torch.Tensor:
        """Feature f's vectors [N_f, W_f] after its table's ``transform`` -> [N_f, D_f]."""
        t, i = self._feature_table[f]
        return t.transform(i, vectors, bags, batch) if t.transforms else vectors

    def _transform_bags(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """The per-id group's rows [B, sum W] read as bags of at most one id -> [B, sum D]."""
        bags, parts = torch.arange(batch), []
        # one run: the rows as they are (a split's backward would copy the whole gradient)
        blocks = [rows] if len(self._runs) == 1 else rows.split([sum(r[2]) for r in self._runs], dim=1)
        for (kind, items, widths), block in zip(self._runs, blocks):
            parts.append(block if kind is None else kind.transform_many(items, block, widths, bags, batch))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _check_ids(self, values: torch.Tensor, bounds: list[int]) -> None:
        """All tables pass ids through: one fused max per table, one min overall."""
        segs = [values[bounds[self._first[i]] : bounds[self._first[i + 1]]] for i in range(len(self.tables))]
        nonempty = [i for i, x in enumerate(segs) if x.numel()]
        if not nonempty:
            return
        maxes = torch.stack(torch._foreach_max([segs[i] for i in nonempty]))
        if bool(values.min() < 0) or bool((maxes >= self._limits[nonempty]).any()):
            for i in nonempty:  # slow path: let the table name the feature
                t = self.tables[i]
                t.remap(segs[i], [bounds[j + 1] - bounds[j] for j in range(self._first[i], self._first[i + 1])])

    # ---- hooks ---------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        losses = [x for x in (t.extra_loss() for t in self.tables) if x is not None]
        return sum(losses) if losses else None

    def on_step_end(self, step: int) -> None:
        for t in self.tables:
            t.on_step_end(step)


def _annotate(cls) -> None:
    """Give ``forward`` torchrec's types (imported here, not at ``import rectables``): fx
    records them, and TorchScript needs them to compile a traced graph."""
    ann = cls.forward.__annotations__
    if not isinstance(ann.get("features"), type):
        from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

        ann["features"] = KeyedJaggedTensor
        ann["return"] = KeyedTensor if cls.pooled else typing.Dict[str, JaggedTensor]


def _torchrec_draws(t: Table, device: torch.device) -> None:
    if t.torchrec_draws and device.type != "meta":
        torch.empty(t.physical_shapes()[0]).normal_()
