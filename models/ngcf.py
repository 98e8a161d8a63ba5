"""Graph collaborative filtering over any rectables table: NGCF (Wang et al., "Neural Graph
Collaborative Filtering", SIGIR 2019) and LightGCN (He et al., "LightGCN: Simplifying and
Powering Graph Convolution Network for Recommendation", SIGIR 2020).

The ego embeddings E0 [N, D] (N = U users + I items) are looked up through an unpooled
collection holding a ``user`` and an ``item`` feature, so hashed, unified, compositional
or dynamic tables replace the full ones; their fused optimizer updates the rows the step
read (here: every row, since propagation reads them all).  With L the symmetric-
normalised adjacency (:func:`data.gowalla.normalized_adjacency`):
- NGCF layer: E' = LeakyReLU_0.2(((L + I) E) W1 + b1 + ((L E) * E) W2 + b2), message
  dropout on E', node dropout on L's edges; the output is the concatenation of E0 and
  each layer's L2-normalised E' ([N, D (L + 1)]).
- LightGCN layer: E' = L E, no weights and no nonlinearity; the output is the mean of
  E0 .. E_L.
Loss: BPR, -log sigmoid(s(u, i) - s(u, j)) for a training pair (u, i) and a sampled item
j the user never interacted with, plus ``l2`` / 2 x the squared norms of the batch's ego
embeddings (averaged over the batch).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("ngcf", "lightgcn")


try:  # the CSR product in C (models/_graph.c): torch's values up to float rounding, ~20% less time
    from models import _graph
except ImportError:  # not built: torch's
    _graph = None


def _spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x for a sparse CSR A [N, N] (column indices in [0, N): :class:`GraphCF` checks) and x
    [N, D]: in C where the kernel is built, A has int64 indices and x is float32 with D a
    multiple of 16 up to 128, else torch's product."""
    D = x.shape[1]
    if _graph is None or adj.crow_indices().dtype != torch.int64 or adj.col_indices().dtype != torch.int64 or \
            x.dtype != torch.float32 or adj.dtype != torch.float32 or D % 16 or not 0 < D <= 128:
        return torch.sparse.mm(adj, x)
    x, y = x.contiguous(), x.new_empty(x.shape)
    _graph.spmm(adj.crow_indices().data_ptr(), adj.col_indices().data_ptr(), adj.values().data_ptr(), x.shape[0],
                x.data_ptr(), D, y.data_ptr())
    return y


class _SymmetricSpMM(torch.autograd.Function):
    """y = A x for a symmetric sparse CSR A [N, N] and x [N, D]; the backward is A grad
    (A^T = A), also a CSR product: torch's own backward of a CSR product took ~8x the
    forward here (0.52 s against 0.07 s for LightGCN's three layers on Gowalla)."""

    @staticmethod
    def forward(ctx, adj, x):
        ctx.adj = adj
        return _spmm(adj, x)

    @staticmethod
    def backward(ctx, grad):
        return None, _spmm(ctx.adj, grad)


class GraphCF(nn.Module):
    """``loss(users [B], pos [B], neg [B])`` -> scalar; ``embeddings()`` -> (users [U, D'],
    items [I, D']) for ranking (eval mode: no dropout)."""

    def __init__(self, embedding: nn.Module, num_users: int, num_items: int, adjacency: torch.Tensor,
                 layers: int = 3, kind: str = "ngcf", message_dropout: float = 0.1, node_dropout: float = 0.0,
                 l2: float = 1e-4):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if sorted(embedding.feature_names) != ["item", "user"]:
            raise ValueError(f"the collection needs exactly the features 'user' and 'item', got {embedding.feature_names}")
        if not (0 <= message_dropout < 1 and 0 <= node_dropout < 1 and layers >= 0 and l2 >= 0):
            raise ValueError("dropouts must lie in [0, 1), layers and l2 must be >= 0")
        if kind == "lightgcn" and message_dropout:
            raise ValueError("LightGCN has no message dropout (set message_dropout=0)")
        N = num_users + num_items
        if adjacency.shape != (N, N):
            raise ValueError(f"adjacency is {tuple(adjacency.shape)}, needs ({N}, {N}) for {num_users} users + {num_items} items")
        self.embedding, self.kind, self.layers = embedding, kind, layers
        self.U, self.I = num_users, num_items
        self.message_dropout, self.node_dropout, self.l2 = message_dropout, node_dropout, l2
        D = embedding.dims[0]
        self.w1 = nn.ModuleList(nn.Linear(D, D) for _ in range(layers if kind == "ngcf" else 0))
        self.w2 = nn.ModuleList(nn.Linear(D, D) for _ in range(layers if kind == "ngcf" else 0))
        for lin in [*self.w1, *self.w2]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.adj = adjacency if adjacency.layout == torch.sparse_csr else adjacency.to_sparse_csr()
        cols = self.adj.col_indices()
        if cols.numel() and not (0 <= int(cols.min()) and int(cols.max()) < N):
            raise ValueError(f"the adjacency's column indices must lie in [0, {N})")
        coo = self.adj.to_sparse_coo().coalesce()
        asym = (coo - coo.t()).coalesce().values()
        if asym.numel() and asym.abs().max() > 0:
            raise ValueError("the adjacency must be symmetric (user-item edges both ways)")
        # node dropout keeps an undirected edge both ways or not at all: the edge of each entry
        # of the CSR arrays [nnz] (in their order), edges numbered by (min, max) of their nodes
        r = torch.repeat_interleave(torch.arange(N), self.adj.crow_indices().diff().long())
        key = torch.minimum(r, cols.long()) * N + torch.maximum(r, cols.long())
        edges = key.unique()
        self._edge_of, self._num_edges = torch.searchsorted(edges, key), len(edges)
        self._kjt = _all_ids(num_users, num_items)

    def ego(self) -> torch.Tensor:
        """E0 [N, D]: every user's row, then every item's, through the collection."""
        out = self.embedding(self._kjt)
        return torch.cat([out["user"].values(), out["item"].values()])

    def _adjacency(self) -> torch.Tensor:
        """L, or in training with node dropout L with each undirected edge (both its entries)
        dropped with probability node_dropout and the rest scaled by 1 / (1 - node_dropout):
        masked straight from L's CSR arrays (29 ms on Gowalla, where rebuilding a CSR from the
        kept edges took 183 ms; interleaved medians)."""
        if not (self.training and self.node_dropout):
            return self.adj
        keep = (torch.rand(self._num_edges) >= self.node_dropout).index_select(0, self._edge_of)
        adj = self.adj
        kept = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.cumsum(0)]).to(adj.crow_indices().dtype)
        return torch.sparse_csr_tensor(kept.index_select(0, adj.crow_indices()), adj.col_indices()[keep],
                                       adj.values()[keep] / (1 - self.node_dropout), adj.shape, check_invariants=False)

    def propagate(self, e0: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final node embeddings [N, D'] from E0 [N, D], or only those of ``rows`` [R] (distinct
        node ids) as [R, D']: every layer but the last still runs over all N nodes, but the
        last layer's transform, the normalisation and the concatenation run over the R rows
        alone (a batch of 8192 reads ~20k of Gowalla's 71k nodes; an NGCF step went from 0.46 to 0.41 s).
        Each tensor's rows are gathered once: the last layer's input rows are the output's
        block of the layer before (each gather's backward is a scatter into a zero [N, D])."""
        adj, e = self._adjacency(), e0
        pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))
        if self.kind == "lightgcn":  # the rows of the sum: one gather (and one scatter back), not one a layer
            total = e0
            for _ in range(self.layers):
                e = _SymmetricSpMM.apply(adj, e)
                total = total + e
            return pick(total) / (self.layers + 1)
        picked = pick(e0)  # the R rows of the current layer input e
        outs = [picked]
        for layer in range(self.layers):
            side = _SymmetricSpMM.apply(adj, e)
            last = layer == self.layers - 1
            if last:  # nothing propagates from the last layer: transform the rows read only
                side, e = pick(side), picked
            p = self.message_dropout if self.training else 0.0
            seed = int(torch.randint(0, 2**62, (1,))) if p else 0  # the dropout mask's
            w1, w2 = self.w1[layer], self.w2[layer]
            e = _NGCFLayerFn.apply(side, e, w1.weight, w1.bias, w2.weight, w2.bias, p, seed)
            picked = e if last else pick(e)
            outs.append(F.normalize(picked, dim=1))
        return torch.cat(outs, 1)

    def loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        e0 = self.ego()
        rows = torch.cat([users, pos + self.U, neg + self.U])
        nodes, at = rows.unique(return_inverse=True)  # index_select, not [at]: its backward is an index_add
        final = self.propagate(e0, nodes)
        fu, fi, fj = final.index_select(0, at).split(len(users))
        diff = (fu * (fi - fj)).sum(1)
        # the squared norms of the R distinct rows, each times its count in the batch: NGCF's
        # output starts with these rows of E0 (no second gather, no second scatter back)
        ego = final[:, : e0.shape[1]] if self.kind == "ngcf" else e0.index_select(0, nodes)
        reg = (ego.square().sum(1) * torch.bincount(at, minlength=len(nodes))).sum() / (2 * len(users))
        return F.softplus(-diff).mean() + self.l2 * reg

    @torch.no_grad()
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        final = self.propagate(self.ego())
        return final[: self.U], final[self.U :]


def _mix32(x: np.ndarray) -> np.ndarray:
    """models/_graph.c's mix32, in place on a uint32 array (numpy's uint32 products wrap)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _keep(n: int, seed: int, t: int) -> np.ndarray:
    """The mask [n] of models/_graph.c's dropout: element i is kept where
    mix32(mix32(low 32 bits of i ^ of seed) ^ high bits of i ^ of seed) >= t."""
    out = np.empty(n, dtype=bool)
    for start in range(0, n, 2**32):  # (in blocks of 2^32 ids, as the kernel)
        h = _mix32(np.arange(min(n - start, 2**32), dtype=np.uint32) ^ np.uint32(seed & 0xFFFFFFFF))
        h ^= np.uint32(((start >> 32) ^ (seed >> 32)) & 0xFFFFFFFF)
        np.greater_equal(_mix32(h), t, out=out[start : start + len(h)])
    return out


def _leaky_drop(x: torch.Tensor, z: torch.Tensor | None, p: float, seed: int, slope: float = 0.2) -> torch.Tensor:
    """(z > 0 ? x : slope x) (z None: x) times NGCF's message-dropout mask / (1 - p), the mask
    a hash of (seed, element index) (:func:`_keep`; the seed drawn from torch's generator,
    so torch.manual_seed fixes it): LeakyReLU then dropout forward (x = z), or their backward
    (x = the gradient).  One pass in C (models/_graph.c) for float32 where the kernel is
    built (1.9 ms on a Gowalla layer [U + I, 64], two threads, where a numpy PCG64 mask took
    ~20 ms and torch's bernoulli_ 33-51 ms: an NGCF step 322 -> 301 ms), else in numpy
    (~55 ms), the same mask."""
    t, scale = min(round(p * 2**32), 2**32 - 1), 1 / (1 - p)  # a share t / 2^32 dropped
    x = x.contiguous()
    if _graph is not None and x.dtype == torch.float32 and (z is None or z.dtype == torch.float32):
        y, z = torch.empty_like(x), None if z is None else z.contiguous()
        _graph.dropout(x.data_ptr(), x.numel(), seed, t, scale, y.data_ptr(), 0 if z is None else z.data_ptr(), slope)
        return y
    if z is not None:
        x = torch.where(z > 0, x, slope * x)
    if t == 0:
        return x
    mask = torch.from_numpy(_keep(x.numel(), seed, t)).view(x.shape)
    return x * mask.to(x.dtype).mul_(torch.tensor(scale, dtype=torch.float32).to(x.dtype))


class _NGCFLayerFn(torch.autograd.Function):
    """NGCF's transform of a layer [n, D] -> [n, H]: dropout_p(LeakyReLU_0.2(z)), z =
    [side + e, side * e] [W1 W2]^T + b1 + b2 (side = L e), with one GEMM on the [n, 2D] pair
    block, and LeakyReLU and the dropout (mask of ``seed``: :func:`_leaky_drop`, drawn again
    in the backward, not stored) in one pass each way: fewer passes over [n, D] than the
    separate ops (an NGCF step on Gowalla 276-280 -> 249-259 ms, interleaved medians).
    forward(side, e, W1, b1, W2, b2, p, seed)."""

    @staticmethod
    def forward(ctx, side, e, W1, b1, W2, b2, p, seed):
        n, D = e.shape
        uv = e.new_empty(n, 2 * D)
        torch.add(side, e, out=uv[:, :D])
        torch.mul(side, e, out=uv[:, D:])
        W = torch.cat([W1, W2], 1)  # [H, 2 D]
        z = torch.addmm(b1 + b2, uv, W.T)
        ctx.save_for_backward(side, e, uv, z, W)
        ctx.p, ctx.seed = p, seed
        return _leaky_drop(z, z, p, seed)

    @staticmethod
    def backward(ctx, g):
        side, e, uv, z, W = ctx.saved_tensors
        D = e.shape[1]
        gz = _leaky_drop(g, z, ctx.p, ctx.seed)
        gW, gb, guv = gz.T @ uv, gz.sum(0), gz @ W
        gu, gv = guv[:, :D], guv[:, D:]
        return torch.addcmul(gu, gv, e), torch.addcmul(gu, gv, side), gW[:, :D], gb, gW[:, D:], gb, None, None


def _all_ids(U: int, I: int):
    """KJT with the features user (ids 0..U-1) and item (0..I-1), one id per bag, padded
    with empty bags to one stride."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    B = max(U, I)
    lengths = torch.cat([torch.ones(U), torch.zeros(B - U), torch.ones(I), torch.zeros(B - I)]).long()
    return KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.cat([torch.arange(U), torch.arange(I)]), lengths)


SAMPLINGS = ("user", "interaction")


def bpr_triples(train, num_items: int, gen: np.random.Generator,
                sampling: str = "user") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, pos, neg) [E], E the number of training interactions, each with a negative item
    drawn uniformly among those its user has no training interaction with.  ``sampling``:
    - "user" (the NGCF and LightGCN authors' code): each triple's user uniform among the users
      with training items, its positive uniform among that user's items; every user weighs
      the same, as in the per-user averages of Recall@k and NDCG@k;
    - "interaction": every training interaction once, shuffled (heavy users weigh more).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    E = len(train.items)
    if sampling == "interaction":
        order = gen.permutation(E)
        users, pos = train.users[order], train.items[order]
    else:
        start, degree = train.offsets[:-1], np.diff(train.offsets)
        active = np.flatnonzero(degree)
        users = active[gen.integers(0, len(active), E)]
        pos = train.items[start[users] + (gen.random(E) * degree[users]).astype(np.int64)]
    from data.sequences import unseen_items

    return users, pos, unseen_items(users, num_items, np.sort(train.users * num_items + train.items), gen)
