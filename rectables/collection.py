"""Collections with torchrec's call shapes, over one fused storage.

``EmbeddingBagCollection(KeyedJaggedTensor) -> KeyedTensor`` (pooled, sum or mean) and
``EmbeddingCollection(KeyedJaggedTensor) -> dict[str, JaggedTensor]`` (one row per id),
so code written for torchrec's EBC / EC switches by changing one constructor.

Each table's ids are remapped to K lanes; lane l of feature f becomes one TBE feature,
ordered table by table, lane-major (all features of lane 0, then lane 1, ...).  The
combine step turns the lanes back into one vector per feature.

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

import torch
from torch import nn

from rectables.optim import SparseOptimizer
from rectables.registry import create_table, table_class
from rectables.storage import FusedStorage
from rectables.table import Table


class _Collection(nn.Module):
    """Plan shared by the pooled and sequence collections."""

    pooled = True

    def __init__(
        self,
        tables: list[Table],
        optimizer: SparseOptimizer | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        names = [t.name for t in tables]
        feats = [f for t in tables for f in t.feature_names]
        if not tables or len(set(names)) != len(names) or len(set(feats)) != len(feats):
            raise ValueError(f"need >= 1 table, unique table names and features; got {names}, {feats}")
        self.tables = nn.ModuleList(tables)
        self.feature_names = feats
        self.dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        shapes: list[tuple[int, int]] = []
        lanes: list[int] = []
        self._base: list[int] = []
        for t in tables:
            base = len(shapes)
            self._base.append(base)
            shapes += t.physical_shapes()
            for lane in range(len(t.lane_tables())):
                lanes += [base + t.lane_table(lane, f) for f in range(len(t.feature_names))]
        self.storage = FusedStorage(shapes, lanes, optimizer or SparseOptimizer(), self.pooled, device)
        for t, base in zip(tables, self._base):
            for k in range(len(t.physical_shapes())):
                self.storage.init_uniform_(base + k, t.init_bound(k))
        self._all_passthrough = all(t.passthrough for t in tables)
        self._first = [0]  # index of each table's first feature
        for t in tables:
            self._first.append(self._first[-1] + len(t.feature_names))
        self._limits = torch.tensor([t.physical_shapes()[0][0] for t in tables])
        # per table: dims of its K lanes (lane l reads table lane_table(l, f), same dim for every f)
        self._lane_dims = [
            [shapes[base + t.lane_table(lane, 0)][1] for lane in range(len(t.lane_tables()))]
            for t, base in zip(tables, self._base)
        ]

    @classmethod
    def from_configs(
        cls,
        configs: list,
        methods: dict[str, str | tuple[str, dict]] | None = None,
        optimizer: SparseOptimizer | None = None,
        device: str | torch.device | None = None,
    ):
        """Build from torchrec ``EmbeddingBagConfig`` / ``EmbeddingConfig`` objects.

        ``methods`` maps a table name to a method, or to ``(method, options)``; tables
        not named are ``full``.  torchrec's ``num_embeddings`` fills the method's size
        argument (``num_ids``, ``num_buckets``) unless the options give it.
        """
        methods = methods or {}
        tables = []
        for c in configs:
            spec = methods.get(c.name, "full")
            name, options = (spec, {}) if isinstance(spec, str) else spec
            options = dict(options)
            size_arg = table_class(name).size_arg
            if size_arg:
                options.setdefault(size_arg, c.num_embeddings)
            pooling = getattr(getattr(c, "pooling", None), "name", "SUM").lower()
            tables.append(
                create_table(
                    name, name=c.name, embedding_dim=c.embedding_dim,
                    feature_names=list(c.feature_names), pooling=pooling, **options,
                )
            )
        return cls(tables, optimizer, device)

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
        """Remap every table and run the fused lookup.  Returns (kjt, output, ids per feature)."""
        kjt = self._align(kjt)
        if kjt.variable_stride_per_key():
            raise ValueError("variable batch size per feature is not supported")
        B = kjt.stride()
        values, lengths, offsets = kjt.values(), kjt.lengths(), kjt.offsets()
        if values.dtype != torch.int64:
            values, offsets = values.long(), offsets.long()
        bounds = offsets[::B].tolist() if B else [0] * (len(self.feature_names) + 1)
        counts = [bounds[i + 1] - bounds[i] for i in range(len(self.feature_names))]
        if self._all_passthrough:
            self._check_ids(values, bounds)
            return kjt, self.storage(values, offsets), counts
        parts, lens, f0 = [], [], 0
        for t in self.tables:
            nf = len(t.feature_names)
            rows = t.remap(values[bounds[f0] : bounds[f0 + nf]], counts[f0 : f0 + nf])
            parts.append(rows.reshape(-1))
            seg = lengths[f0 * B : (f0 + nf) * B]
            lens.append(seg if rows.shape[0] == 1 else seg.repeat(rows.shape[0]))
            f0 += nf
        indices = torch.cat(parts) if len(parts) > 1 else parts[0]
        if all(len(d) == 1 for d in self._lane_dims):  # one lane per feature: bags unchanged
            return kjt, self.storage(indices, offsets), counts
        lens_all = torch.cat(lens) if len(lens) > 1 else lens[0]
        tbe_offsets = torch.zeros(lens_all.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens_all, 0, out=tbe_offsets[1:])
        return kjt, self.storage(indices, tbe_offsets), counts

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


class EmbeddingBagCollection(_Collection):
    """Pooled lookup: ``forward(KeyedJaggedTensor [F keys, B bags]) -> KeyedTensor [B, sum D]``."""

    pooled = True

    def __init__(self, tables, optimizer=None, device=None) -> None:
        super().__init__(tables, optimizer, device)
        self._mean = any(t.pooling == "mean" for t in tables)
        self._combines = any(len(d) > 1 for d in self._lane_dims)  # else TBE output is final

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        kjt, out, _ = self._lookup(features)
        B = out.shape[0]
        pieces, col, copy = [], 0, False
        for t, dims in zip(self.tables, self._lane_dims if self._combines else []):
            nf, k = len(t.feature_names), len(dims)
            block = out[:, col : col + nf * sum(dims)]
            col += nf * sum(dims)
            if k > 1 and t.combine == "sum":
                block = block.reshape(B, k, nf * t.embedding_dim).sum(1)
                copy = True
            elif k > 1 and nf > 1:
                lane_blocks = block.split([nf * d for d in dims], dim=1)
                block = torch.cat([b.reshape(B, nf, -1) for b in lane_blocks], dim=2).reshape(B, -1)
                copy = True
            pieces.append(block)
        out = torch.cat(pieces, dim=1) if copy else out
        if self._mean:
            out = out * self._mean_scale(kjt.lengths(), B)
        return KeyedTensor(keys=self.feature_names, length_per_key=self.dims, values=out)

    def _mean_scale(self, lengths: torch.Tensor, B: int) -> torch.Tensor:
        """[B, sum D]: 1/max(L, 1) on columns of mean-pooled features, 1 elsewhere."""
        inv = 1.0 / lengths.view(-1, B).t().clamp(min=1).float()  # [B, F]
        is_mean = torch.tensor([t.pooling == "mean" for t in self.tables for _ in t.feature_names])
        per_feature = torch.where(is_mean, inv, torch.ones_like(inv))
        return per_feature.repeat_interleave(torch.tensor(self.dims), dim=1)


class EmbeddingCollection(_Collection):
    """Unpooled lookup: ``forward(KeyedJaggedTensor) -> dict[str, JaggedTensor]`` of [N_f, D].

    As in torchrec's EmbeddingCollection, all tables share one embedding dim.
    """

    pooled = False

    def __init__(self, tables, optimizer=None, device=None) -> None:
        if len({t.embedding_dim for t in tables}) > 1:
            raise ValueError("EmbeddingCollection needs one embedding_dim for all tables")
        super().__init__(tables, optimizer, device)

    def forward(self, features) -> dict:
        from torchrec.sparse.jagged_tensor import JaggedTensor

        kjt, out, counts = self._lookup(features)
        B = kjt.stride()
        lengths = kjt.lengths()
        result, row, f0 = {}, 0, 0
        for t in self.tables:
            nf, k = len(t.feature_names), len(t.lane_tables())
            n = sum(counts[f0 : f0 + nf])
            block = out[row : row + k * n]
            row += k * n
            if k > 1:
                lanes = block.view(k, n, -1)
                block = lanes.sum(0) if t.combine == "sum" else lanes.permute(1, 0, 2).reshape(n, -1)
            for i, (name, v) in enumerate(zip(t.feature_names, block.split(counts[f0 : f0 + nf]))):
                seg = lengths[(f0 + i) * B : (f0 + i + 1) * B]
                result[name] = JaggedTensor(values=v, lengths=seg)
            f0 += nf
        return result
