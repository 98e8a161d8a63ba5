"""Fused physical storage: every physical table of a collection in one fbgemm TBE.

fbgemm's ``SplitTableBatchedEmbeddingBagsCodegen`` (HOST placement, CPU compute) holds
the rows of all physical tables in one flat buffer and applies SGD / Adagrad /
row-wise Adagrad inside its backward, so no table gradient is ever materialised.
Row-wise Adam runs on the touched rows only: in the compiled update (``rectables/_rowupdate.c``)
with the others, or through :func:`rectables.optim.sparse_adam_step` where it is not built.

Shapes: T lanes (one TBE "feature" each, several lanes may read one physical table),
B bags per lane, N ids in all, D_t the dim of lane t, M_k rows of physical table k.
fbgemm stores rows of a multiple of 4 values: a table of another dim D is stored with
its rows padded to P = 4 * ceil(D / 4) with zeros that are never read out (their gradient
is 0, so they stay 0); ``weight(k)`` is the [M, D] view, the bytes count P.
Row-wise optimizers (row-wise Adagrad, our Adam) then average a row's squared gradient
over P values instead of D.
Lookups are always pooled (sum): a per-id lookup is a bag of one id.  (fbgemm's CPU
unpooled kernels are avoided: their backward is ~15x slower per id, and they read
wrong rows unless lanes are in table order.)
The update of SGD, Adagrad and row-wise Adagrad on float32 rows runs in our own kernel
(``rectables/_rowupdate.c``) in the lookup's backward, on fbgemm's rows and state: the
same update as fbgemm's CPU backward, which spends ~1 us per distinct row (3x the whole
step of SGD at Criteo size with row-wise Adagrad).  Without the compiled kernel, or where
per-id weights take a gradient, fbgemm's backward runs.
"""
from __future__ import annotations

import torch
from torch import nn

from rectables.optim import SparseOptimizer, sparse_adam_step

try:
    from rectables import _rowupdate
except ImportError:  # no compiler at install: fbgemm's backward applies the update
    _rowupdate = None

_KERNEL_OPT = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "adam": 3}  # the optimizers of _rowupdate.update

_FBGEMM_OPT = {
    "sgd": "EXACT_SGD",
    "adagrad": "EXACT_ADAGRAD",
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
    "adam": "EXACT_SGD",  # weights only; the update is ours
}



def stored_dim(d: int) -> int:
    """fbgemm's row width for a dim: the next multiple of 4."""
    return -(-d // 4) * 4

class FusedStorage(nn.Module):
    """Physical tables [M_k, D_k] in one fused TBE; lookups by lane.

    ``forward(indices [N], offsets [T*B+1])`` returns the bag sums [B, sum_t D_t], lanes
    in the caller's order whatever order the TBE keeps them in.
    """

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        lane_tables: list[int],
        optimizer: SparseOptimizer,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            BoundsCheckMode,
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        device = torch.device(device or "cpu")
        if device.type not in ("cpu", "meta"):
            raise ValueError(f"fused storage runs on cpu or meta, not {device}")
        self.shapes = [(int(m), int(d)) for m, d in shapes]
        self._padded = [stored_dim(d) for _, d in self.shapes]
        self.lane_tables = list(lane_tables)
        self.optimizer = optimizer
        # fbgemm's CPU backward takes a run of consecutive lanes to be one table (and breaks
        # if table numbers go down): number tables by first use, and if a table's lanes are
        # still apart (unified with T >= 2), sort lanes by table and put the columns back.
        rank: dict[int, int] = {}
        for k in self.lane_tables + list(range(len(self.shapes))):
            rank.setdefault(k, len(rank))
        self._pos = [rank[k] for k in range(len(self.shapes))]  # TBE position of table k
        perm = sorted(range(len(self.lane_tables)), key=lambda i: rank[self.lane_tables[i]])
        self._tbe_lanes = [self.lane_tables[i] for i in perm]  # table of each TBE lane
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(self.shapes[k][0], self._padded[k], EmbeddingLocation.HOST, ComputeDevice.CPU)
             for k in sorted(rank, key=rank.get)],
            feature_table_map=[rank[k] for k in self._tbe_lanes],
            optimizer=getattr(EmbOptimType, _FBGEMM_OPT[optimizer.name]),
            learning_rate=optimizer.lr,
            eps=optimizer.eps,
            pooling_mode=PoolingMode.SUM,
            # ids are validated (or in range by construction) before they get here;
            # fbgemm's own check costs ~25% of the forward.
            bounds_check_mode=BoundsCheckMode.NONE,
            weights_precision={torch.float32: SparseType.FP32, torch.float16: SparseType.FP16}[dtype],
            device=device,
        )
        self._w_off = [int(self.tbe.weights_physical_offsets[p]) for p in self._pos]
        self._col = [0]  # columns of each TBE lane in the TBE output
        for k in self._tbe_lanes:
            self._col.append(self._col[-1] + self._padded[k])
        self._lane_perm = None if perm == sorted(perm) else perm
        self._row_off = [0]  # table k's first row among all tables' rows (Adam's exp_avg_sq)
        for m, _ in self.shapes:
            self._row_off.append(self._row_off[-1] + m)
        self._native = _rowupdate is not None and dtype == torch.float32 and device.type == "cpu"
        if self._native:  # per TBE lane: rows' offset in the flat rows, row width, state offset, first column
            pos = [rank[k] for k in self._tbe_lanes]
            if optimizer.name == "adam":
                state = [self._row_off[k] for k in self._tbe_lanes]
            elif optimizer.name == "sgd":
                state = [0] * len(pos)
            else:
                state = [int(self.tbe.momentum1_physical_offsets[p]) for p in pos]
            self._lane_args = torch.tensor([[int(self.tbe.weights_physical_offsets[p]) for p in pos],
                                            [self._padded[k] for k in self._tbe_lanes],
                                            state, self._col[:-1]], dtype=torch.int64)
        self._lane_rows = torch.tensor([self.shapes[k][0] for k in self._tbe_lanes], dtype=torch.int64)
        self._col_back = None  # TBE output columns of the caller's lanes, in order, padding dropped
        if self._lane_perm is not None or self._padded != [d for _, d in self.shapes]:
            where = {lane: j for j, lane in enumerate(perm)}
            self._col_back = torch.cat([torch.arange(self._col[where[i]], self._col[where[i]] + self.shapes[k][1])
                                        for i, k in enumerate(self.lane_tables)])
        if optimizer.name == "adam":
            rows = sum(m for m, _ in self.shapes)
            self.register_buffer("adam_exp_avg", torch.zeros(self.tbe.weights_host.numel(), device=device), False)
            self.register_buffer("adam_exp_avg_sq", torch.zeros(rows, device=device), False)
            self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64, device=device), False)
        self._anchor = torch.zeros(0, requires_grad=True)  # makes autograd call _OwnUpdate's backward
        self._unregister_tbe_state()

    def _unregister_tbe_state(self) -> None:
        """The TBE's rows and optimizer state stay plain attributes, out of ``parameters()``
        and ``state_dict()``: the collection shows each table's rows under torchrec's keys,
        and optimizer state goes through ``optimizer_state_dict`` (as torch keeps an
        optimizer's state apart from its model).  fbgemm's bookkeeping buffers are
        derived from the shapes, so they are not saved either."""
        tbe = self.tbe
        for name in list(tbe._parameters):
            object.__setattr__(tbe, name, tbe._parameters.pop(name))
        tbe._non_persistent_buffers_set.update(tbe._buffers)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the storage holds (rows, optimizer state, fbgemm's bookkeeping)."""
        extra = [getattr(self.tbe, n) for n in ("weights_host", "momentum1_host", "momentum2_host")]
        return [t for t in extra if isinstance(t, torch.Tensor)] + list(self.buffers())

    def optimizer_state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer state, ``"<table k>.<name>"`` (and Adam's ``step``): views, as a
        torch optimizer's ``state_dict`` holds references (saving writes each buffer once)."""
        out = {f"{k}.{n}": t for k in range(len(self.shapes)) for n, t in self.optimizer_state(k).items()}
        if self.optimizer.name == "adam":
            out["step"] = self.adam_step
        return out

    @torch.no_grad()
    def load_optimizer_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.optimizer_state_dict()
        if set(state) != set(mine):
            raise ValueError(f"optimizer state of {self.optimizer.name!r} has keys {sorted(mine)}, got {sorted(state)}")
        for k, t in mine.items():
            t.copy_(state[k])

    # ---- views ---------------------------------------------------------------------
    def weight(self, k: int) -> torch.Tensor:
        """View [M_k, D_k] of physical table k (writes go to the fused buffer)."""
        return self._stored(k)[:, : self.shapes[k][1]]

    def _stored(self, k: int) -> torch.Tensor:
        """View [M_k, P_k] of physical table k, padding included."""
        m, d = self.shapes[k][0], self._padded[k]
        o = self._w_off[k]
        return self.tbe.weights_host.detach()[o : o + m * d].view(m, d)

    def weight_bytes(self, k: int) -> int:
        """Bytes that physical table k's rows take, padding included."""
        return self._stored(k).nbytes

    def optimizer_state(self, k: int) -> dict[str, torch.Tensor]:
        """Views of the optimizer state of physical table k (empty for SGD; [M_k, P_k] per element)."""
        m, d = self.shapes[k][0], self._padded[k]
        name = self.optimizer.name
        if name in ("adagrad", "rowwise_adagrad"):
            o = int(self.tbe.momentum1_physical_offsets[self._pos[k]])
            n = m * d if name == "adagrad" else m
            flat = self.tbe.momentum1_host.detach()[o : o + n]
            return {"sum": flat.view(m, d) if name == "adagrad" else flat}
        if name == "adam":
            o, r = self._w_off[k], self._row_off[k]
            return {
                "exp_avg": self.adam_exp_avg[o : o + m * d].view(m, d),
                "exp_avg_sq": self.adam_exp_avg_sq[r : r + m],
            }
        return {}

    @torch.no_grad()
    def reset_rows(self, k: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Rows [R] of table k set to ``values`` [R, D_k], and their optimizer state zeroed."""
        w = self.weight(k)
        w.index_copy_(0, rows, values.to(w.dtype))
        for s in self.optimizer_state(k).values():
            s.index_fill_(0, rows, 0.0)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer = SparseOptimizer(**{**self.optimizer.__dict__, "lr": lr})
        self.tbe.set_learning_rate(lr)

    # ---- lookup --------------------------------------------------------------------
    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bag sums [B, sum_t D_t]; ``weights`` [N] (optional) scale each id's row."""
        if self._lane_perm is not None:
            indices, offsets, weights = self._sort_lanes(indices, offsets, weights)
        weights_grad = weights is not None and weights.requires_grad and torch.is_grad_enabled()
        if weights_grad and self.optimizer.name == "adam":
            raise ValueError("per-id weights that require grad (e.g. learned position weights) need a fused "
                             "optimizer that returns their gradient: sgd, adagrad or rowwise_adagrad, not adam")
        if torch.is_grad_enabled() and (self.optimizer.name == "adam" or (self._native and not weights_grad)):
            out = _OwnUpdate.apply(self, indices, offsets, weights, self._anchor)
        elif weights_grad:
            out = self.tbe(indices, offsets, per_sample_weights=weights)
        else:
            out = self.lookup(indices, offsets, weights)
        return out if self._col_back is None else out.index_select(1, self._col_back)

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor, weights=None) -> torch.Tensor:
        """fbgemm's TBE forward (no autograd), in TBE lane order: where every bag holds one id
        or none and there are no per-id weights (sequence lookups, a graph's every row), the
        rows copied in the compiled kernel instead, the same values."""
        T = len(self._tbe_lanes)
        if weights is None and self._native and indices.numel() <= offsets.numel() - 1 and indices.numel() and \
                indices.dtype == offsets.dtype == torch.int64:
            indices, offsets, la = indices.contiguous(), offsets.contiguous(), self._lane_args
            B = (offsets.numel() - 1) // T
            out = torch.empty(B, self._col[-1])
            if _rowupdate.lookup(self.tbe.weights_host.data_ptr(), indices.data_ptr(), offsets.data_ptr(),
                                 la[0].data_ptr(), la[1].data_ptr(), la[3].data_ptr(), self._lane_rows.data_ptr(), T,
                                 B, out.shape[1], out.data_ptr()):
                return out
        return self.tbe(indices, offsets, per_sample_weights=weights)

    def _sort_lanes(self, indices, offsets, weights):
        """Ids [N], offsets [T*B+1], weights [N] or None of the caller's lanes -> the same in TBE lane order."""
        T = len(self.lane_tables)
        B = (offsets.numel() - 1) // T
        if B == 0:
            return indices, offsets, weights
        bounds = offsets[::B].tolist()
        indices = torch.cat([indices[bounds[i] : bounds[i + 1]] for i in self._lane_perm])
        if weights is not None:
            weights = torch.cat([weights[bounds[i] : bounds[i + 1]] for i in self._lane_perm])
        lengths = offsets.diff().view(T, B)[self._lane_perm].reshape(-1)
        sorted_offsets = torch.zeros_like(offsets)
        torch.cumsum(lengths, 0, out=sorted_offsets[1:])
        return indices, sorted_offsets, weights

    @torch.no_grad()
    def adam_update(self, indices: torch.Tensor, offsets: torch.Tensor, grad: torch.Tensor, weights=None) -> None:
        """Sum the gradient per touched row and apply row-wise Adam, table by table."""
        self.adam_step += 1
        if self._native:
            self.row_update(indices, offsets, grad, weights)
            return
        step = int(self.adam_step)
        T = len(self._tbe_lanes)
        B = (offsets.numel() - 1) // T
        if B == 0:  # an empty batch touches no row
            return
        bounds = offsets[::B].tolist()
        per_table: dict[int, tuple[list, list]] = {}
        for lane, k in enumerate(self._tbe_lanes):  # TBE lane order
            s, e = bounds[lane], bounds[lane + 1]
            if e == s:
                continue
            ids = indices[s:e]
            bag = torch.repeat_interleave(torch.arange(B), offsets[lane * B : (lane + 1) * B + 1].diff(), output_size=e - s)
            g = grad[:, self._col[lane] : self._col[lane + 1]].index_select(0, bag)
            if weights is not None:
                g = g * weights[s:e].unsqueeze(1)
            acc = per_table.setdefault(k, ([], []))
            acc[0].append(ids)
            acc[1].append(g)
        for k, (ids, gs) in per_table.items():
            rows, inv = torch.unique(torch.cat(ids), return_inverse=True)
            g = torch.zeros(len(rows), self._padded[k]).index_add_(0, inv, torch.cat(gs))
            st = self.optimizer_state(k)
            sparse_adam_step(self._stored(k), st["exp_avg"], st["exp_avg_sq"], rows, g, step, self.optimizer)

    @torch.no_grad()
    def row_update(self, indices: torch.Tensor, offsets: torch.Tensor, grad: torch.Tensor, weights=None) -> None:
        """SGD, Adagrad, row-wise Adagrad or row-wise Adam (at the step :meth:`adam_update`
        counted) on the rows the lookup (TBE lane order) read, in the compiled kernel."""
        indices, offsets = indices.contiguous().long(), offsets.contiguous().long()
        grad = grad.float().contiguous()
        weights = None if weights is None else weights.detach().float().contiguous()
        o, m, lr, adam = self.optimizer, None, self.optimizer.lr, ()
        if o.name == "adam":  # (exp_avg, betas, bias correction of exp_avg_sq); lr takes exp_avg's
            step = int(self.adam_step)
            m, lr = self.adam_exp_avg_sq, o.lr / (1 - o.beta1**step)
            adam = (self.adam_exp_avg.data_ptr(), o.beta1, o.beta2, 1 - o.beta2**step)
        elif o.name != "sgd":
            m = self.tbe.momentum1_host
        T = len(self._tbe_lanes)
        la = self._lane_args
        _rowupdate.update(_KERNEL_OPT[self.optimizer.name], lr, self.optimizer.eps,
                          self.tbe.weights_host.data_ptr(), 0 if m is None else m.data_ptr(), indices.data_ptr(),
                          offsets.data_ptr(), 0 if weights is None else weights.data_ptr(), grad.data_ptr(),
                          la[0].data_ptr(), la[1].data_ptr(), la[2].data_ptr(), la[3].data_ptr(),
                          T, (offsets.numel() - 1) // T, grad.shape[1], indices.numel(), max(self._padded),
                          torch.get_num_threads(), *adam)


class _OwnUpdate(torch.autograd.Function):
    """TBE lookup whose backward applies our sparse update (Adam, or the compiled kernel)
    instead of fbgemm's."""

    @staticmethod
    def forward(ctx, storage, indices, offsets, weights, anchor):  # type: ignore[override]
        ctx.storage, ctx.weights = storage, weights
        ctx.save_for_backward(indices, offsets)
        with torch.no_grad():
            return storage.lookup(indices, offsets, weights)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        indices, offsets = ctx.saved_tensors
        st = ctx.storage
        (st.adam_update if st.optimizer.name == "adam" else st.row_update)(indices, offsets, grad.contiguous(),
                                                                          ctx.weights)
        return None, None, None, None, None
