"""``optembed``: the supernet table of OptEmbed (Lyu et al., "OptEmbed: Learning Optimal
Embedding Table for Click-through Rate Prediction", CIKM 2022), which learns which rows
and how many dims of each feature to keep.

Physical tables: one per feature, [n + 1, D]: row x < n is id x's, row n the **zero
row** that pruned ids read once the mask is fixed.

- **Row pruning.**  Feature f's row e of id x is kept where its L1 norm exceeds the
  feature's learnable threshold t_f: it reads e · S(||e||_1 - t_f), S the unit step,
  whose straight-through derivative is the paper's long tail (``step_grad``).  A pruned
  row reads as zeros.  ``extra_loss`` = alpha · sum_f exp(-t_f) pushes the thresholds up;
  they train in the model's dense optimizer at their own rate ``threshold_lr``.
- **Dim search (supernet).**  In training each sample and feature keeps a prefix of d
  dims, d drawn uniformly from ``candidate_dims`` (a hash of the table's seed, its count
  of training lookups, the feature and the sample: a resumed run draws the same); in
  evaluation all D, or the dims that :meth:`set_dims` fixed (the search's candidates).
- **Retrain.**  :meth:`fix` freezes both: ids whose row was pruned read the zero row, and
  feature f keeps its first ``dims[f]`` dims.  A row of zeros reads as zeros and takes no
  gradient, so the zero row stays zero under every optimizer.
- **Export.**  :meth:`compact` gives the ``compact`` table of the kept rows at their dims.

The mask needs each id's own row, so the table is looked up one row per id (the core's
``transform``); bags of one id (Criteo) are still read pooled.  The masks cost one pass
over the lookup each way (``rectables/_masks.c``).
Shapes: F features, N ids, B batch, D dim, M = n + 1 rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F_

from rectables import hashing
from rectables.registry import register
from rectables.table import Table, check_range

try:  # the compiled masks (setup.py); without them the torch path gives the same results
    from rectables import _masks as _kernels
except ImportError:  # pragma: no cover
    _kernels = None


def step_grad(x: torch.Tensor) -> torch.Tensor:
    """OptEmbed's long-tailed straight-through derivative of the unit step at ``x``:
    2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond."""
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))


def _prefixes(D: int) -> torch.Tensor:
    """[D + 1, D]: row k holds k ones, then zeros (a float mask: a bool one costs ~8x)."""
    return torch.tril(torch.ones(D + 1, D), diagonal=-1)


def masked(v: torch.Tensor, th: torch.Tensor, dims: torch.Tensor, D: int) -> torch.Tensor:
    """MaskRows' forward in torch ops: [N, F, D] rows, thresholds [F], dims [N, F]."""
    x = v.abs().sum(2) - th
    return v * F_.embedding(torch.where(x > 0, dims, 0), _prefixes(D))


class MaskRows(torch.autograd.Function):
    """OptEmbed's masks of vectors ``v`` [N, F, D]: a row whose L1 norm is not above its
    feature's threshold ``th`` [F] reads zeros, and a kept one its first ``dims`` [N, F]
    values.  Backward: the masked gradient, plus with ``ste`` the straight-through step's
    (``step_grad``) through each row's norm to the row (the sign of each value) and to
    the threshold.  One pass each way in ``rectables/_masks.c`` (``native``); the torch
    path gives the same results up to the order of the norm sums."""

    @staticmethod
    def forward(ctx, v, th, dims, ste, native=True):  # type: ignore[override]
        v, th, dims = v.contiguous(), th.detach().contiguous(), dims.contiguous()
        ctx.native = native and _kernels is not None and v.dtype == torch.float32
        ctx.ste = ste
        if ctx.native:
            out, x = torch.empty_like(v), v.new_empty(v.shape[:2])
            _kernels.forward(v.data_ptr(), dims.numel(), v.shape[2], th.data_ptr(), th.numel(), dims.data_ptr(),
                             out.data_ptr(), x.data_ptr())
        else:
            x = v.abs().sum(2) - th
            out = masked(v, th, dims, v.shape[2])
        ctx.save_for_backward(v, x, dims)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        v, x, dims = ctx.saved_tensors
        g = g.contiguous()
        if ctx.native:
            gv, gth = torch.empty_like(v), v.new_empty(v.shape[1])
            _kernels.backward(g.data_ptr(), v.data_ptr(), x.data_ptr(), dims.data_ptr(), dims.numel(), v.shape[2],
                              v.shape[1], gv.data_ptr(), gth.data_ptr(), ctx.ste)
            return gv, gth if ctx.ste else None, None, None, None
        prefixes = _prefixes(v.shape[2])
        gv = g * F_.embedding(torch.where(x > 0, dims, 0), prefixes)
        if not ctx.ste:
            return gv, None, None, None, None
        s = step_grad(x) * (g * v * F_.embedding(dims, prefixes)).sum(2)  # [N, F]
        return torch.addcmul(gv, v.sign(), s.unsqueeze(2)), -s.sum(0), None, None, None


def _draw(items: list, batch: int) -> torch.Tensor:
    """Dims kept [batch, F] by the samples of each (table, feature) in ``items`` in this
    training step: candidate ``hash(table seed, its step, feature, sample) mod C``, uniform
    and repeatable (a resumed run draws the same), computed without reading the counters
    back to Python."""
    seeds, steps = torch.stack([t.seed for t, _ in items]), torch.stack([t.step for t, _ in items])
    features = torch.tensor([f for _, f in items])
    keys = hashing._mix64_(seeds * _ODD[0] ^ hashing._mix64_(steps * _ODD[1] ^ features * _ODD[2]))  # [F], on device
    h = hashing._mix64_(torch.arange(batch).unsqueeze(1) * _ODD[3] ^ keys)  # [batch, F]
    counts = torch.tensor([len(t.candidate_dims) for t, _ in items])
    idx = (((h >> 33) & 0x7FFFFFFF) * counts) >> 31  # in [0, C_f): the top 31 bits scaled
    if len({tuple(t.candidate_dims) for t, _ in items}) == 1:
        return items[0][0]._cands[idx]
    return torch.stack([t._cands[idx[:, i]] for i, (t, _) in enumerate(items)], dim=1)


#: odd multipliers < 2^63 that spread seeds, steps, features and sample numbers apart
_ODD = (0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB, 0x2545F4914F6CDD1D)


@register
class OptEmbedTable(Table):
    """OptEmbed's supernet: learned row thresholds and sampled dim prefixes, one physical
    table of n + 1 rows per feature."""

    method = "optembed"
    size_arg = "num_ids"
    raw_ids = False
    no_budget = "learns its own size (row pruning and a dim search: rectables optembed)"

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        num_ids: int,
        alpha: float = 1e-4,
        threshold_lr: float = 0.01,
        threshold_init: float = 0.0,
        candidate_dims: list[int] | None = None,
        seed: int = 0,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        if num_ids <= 0:
            raise ValueError(f"table {name!r}: num_ids must be > 0, got {num_ids}")
        if alpha < 0 or not threshold_lr > 0 or not math.isfinite(threshold_init):
            raise ValueError(f"table {name!r}: need alpha >= 0, threshold_lr > 0 and a finite threshold_init; "
                             f"got {alpha}, {threshold_lr}, {threshold_init}")
        cands = sorted(set(candidate_dims)) if candidate_dims else list(range(1, embedding_dim + 1))
        if cands[0] < 1 or cands[-1] > embedding_dim:
            raise ValueError(f"table {name!r}: candidate_dims must lie in [1, {embedding_dim}], got {candidate_dims}")
        self.num_ids, self.alpha, self.threshold_lr = int(num_ids), float(alpha), float(threshold_lr)
        self.threshold_init, self.candidate_dims = float(threshold_init), cands
        F = len(feature_names)
        self.threshold = torch.nn.Parameter(torch.full((F,), self.threshold_init))
        self.param_lrs = {"threshold": self.threshold_lr}
        self.register_buffer("fixed", torch.tensor(False))
        self.register_buffer("dims", torch.zeros(F, dtype=torch.int64))  # 0: all D
        self.register_buffer("keep", torch.ones(F, self.num_ids, dtype=torch.bool))
        self.register_buffer("_cands", torch.tensor(cands), persistent=False)
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))  # training lookups so far

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        """The supernet of all n ids; OptEmbed chooses its own size, so only fraction 1."""
        if fraction != 1:
            raise ValueError(f"table {name!r}: method 'optembed' {cls.no_budget}; it takes no budget, got {fraction:g}")
        return cls(name, embedding_dim, feature_names, num_ids, seed=seed)

    def physical_shapes(self) -> list[tuple[int, int]]:
        return [(self.num_ids + 1, self.embedding_dim)] * len(self.feature_names)

    def feature_lanes(self, f: int) -> list[int]:
        return [f]

    def init_weight_(self, k: int, weight: torch.Tensor) -> None:
        super().init_weight_(k, weight)
        weight[self.num_ids].zero_()

    def init_bound(self, k: int) -> float:
        return math.sqrt(1.0 / self.num_ids)

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        check_range(self, values, counts, self.num_ids)
        if self.training:
            self.step += 1
        if bool(self.fixed):  # pruned ids read the zero row
            f = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts), output_size=values.numel())
            values = torch.where(self.keep.view(-1)[f * self.num_ids + values], values, self.num_ids)
        return self.per_feature(values.unsqueeze(0), counts)

    # ---- the mask ---------------------------------------------------------------------
    def transform(self, f: int, vectors: torch.Tensor, bags: torch.Tensor, batch: int) -> torch.Tensor:
        return self.transform_many([(self, f)], vectors, [self.embedding_dim], bags, batch)

    @classmethod
    def transform_many(cls, items, vectors, widths, bags, batch):
        """The masks of F features at once: ``vectors`` [N, F * D] as [N, F, D]."""
        tables = [t for t, _ in items]
        flags = torch.stack([t.fixed for t in tables])  # one host read for all tables, not one each
        D, fixed, training = tables[0].embedding_dim, bool(flags.all()), tables[0].training
        if len(items) > 1 and (fixed != bool(flags.any()) or any(t.embedding_dim != D or t.training != training
                                                                  for t in tables)):
            return super().transform_many(items, vectors, widths, bags, batch)  # one by one
        v = vectors.view(vectors.shape[0], len(items), D)
        if training and not fixed:  # a prefix of d dims drawn per sample and feature
            if all(t.candidate_dims == [D] for t in tables):
                dims = v.new_full(v.shape[:2], D, dtype=torch.int64)
            else:
                dims = _draw(items, batch)[bags]  # [N, F]
        else:
            dims = torch.cat([t.dims[f : f + 1] for t, f in items])
            dims = torch.where(dims == 0, D, dims).expand(v.shape[:2])
        # fixed: the zero row (a pruned id: norm 0, not above 0) reads zeros and takes no gradient
        th = torch.zeros(len(items)) if fixed else torch.cat([t.threshold[f : f + 1] for t, f in items])
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # torch ops only (fx, TorchScript)
            return masked(v, th, dims, D).view(vectors.shape)
        return MaskRows.apply(v, th, dims, not fixed).view(vectors.shape)

    def extra_loss(self) -> torch.Tensor | None:
        if bool(self.fixed) or self.alpha == 0:
            return None
        return self.alpha * torch.exp(-self.threshold).sum()

    def row_masks(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Rows kept now [F, n]: L1 norm of each id's row (``weights[f]`` [n + 1, D], the
        feature's physical table) above the feature's threshold."""
        with torch.no_grad():
            return torch.stack([w[: self.num_ids].abs().sum(1) > t for w, t in zip(weights, self.threshold)])

    @torch.no_grad()
    def set_dims(self, dims: list[int] | None) -> None:
        """Evaluate with feature f at its first ``dims[f]`` dims (None: all D)."""
        dims = dims or [0] * len(self.feature_names)
        if len(dims) != len(self.feature_names) or any(not 0 <= d <= self.embedding_dim for d in dims):
            raise ValueError(f"table {self.name!r}: need {len(self.feature_names)} dims in [1, {self.embedding_dim}], "
                             f"got {dims}")
        self.dims.copy_(torch.tensor(dims))

    @torch.no_grad()
    def fix(self, keep: torch.Tensor, dims: list[int]) -> None:
        """Retrain mode: rows ``keep`` [F, n] only (the others read the zero row) and
        feature f at ``dims[f]`` dims, the thresholds no longer used."""
        if keep.shape != self.keep.shape:
            raise ValueError(f"table {self.name!r}: keep must be {tuple(self.keep.shape)}, got {tuple(keep.shape)}")
        self.set_dims(dims)
        self.keep.copy_(keep)
        self.fixed.fill_(True)

    def compact(self, weights: list[torch.Tensor]):
        """The ``compact`` table of the kept rows of ``weights[f]`` [n + 1, D] at each
        feature's dim (zero-padded to D), and its rows [M_f, d_f] to load."""
        from rectables.methods.compact import CompactTable

        if not bool(self.fixed):
            raise RuntimeError(f"table {self.name!r}: fix() the mask before export")
        D = self.embedding_dim
        dims = [int(d) or D for d in self.dims]
        kept = [self.keep[f].nonzero().squeeze(1) for f in range(len(self.feature_names))]
        table = CompactTable(self.name, D, self.feature_names, self.num_ids, [len(k) for k in kept], dims,
                             pooling=self.pooling)
        table.set_remap(kept)
        rows = [torch.cat([w[k, :d], w.new_zeros(1, d)]) for w, k, d in zip(weights, kept, dims)]
        return table, rows

    def settings(self) -> dict:
        return {**super().settings(), "fixed": bool(self.fixed), "dims": [int(d) for d in self.dims]}
