"""Building blocks: MLP and the DLRM dot interaction."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], last_activation: bool = True) -> "MLP":
    """Linear layers sizes[0] -> ... -> sizes[-1] with ReLU between (and after, if asked)."""
    return MLP(sizes, last_activation)


class MLP(nn.Module):
    """x [B, sizes[0]] -> [B, sizes[-1]]: Linear layers with ReLU between (and after the
    last one if ``last_activation``).  Parameters are ``layers[i].weight / .bias``.

    In training, the activations between layers and the gradients flowing back through
    them live in scratch buffers reused from step to step, and the ReLU works in place
    (forward and backward): a fresh [4096, 512] float tensor page-faults on every call,
    which cost the DLRM step more than the ReLUs themselves.  Forward takes a buffer set
    and backward gives it back; a forward whose earlier set is still held (no backward
    yet) takes a new one, so several forwards before one backward stay correct.  The
    output of the last layer is always a fresh tensor.  An input width that is not a
    multiple of 8 is padded with zero columns (and the first weight with zero columns)
    for the GEMMs: the same sums, but DLRM's 367-wide top input ran its three GEMMs in
    47 ms against 35 ms at 368 here.  Hooks on the inner ``layers`` do not run in
    training (the layers are applied by one autograd function).
    """

    def __init__(self, sizes: list[int], last_activation: bool = True):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least two sizes, got {sizes}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        n = len(self.layers)
        self.relu = [i < n - 1 or last_activation for i in range(n)]
        self._free: list[_Scratch] = []  # sets not held by a pending backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for layer in self.layers for p in (layer.weight, layer.bias)]
        if torch.is_grad_enabled() and x.dim() == 2 and (x.requires_grad or any(p.requires_grad for p in params)):
            return _MLP.apply(self, x, *params)  # a backward will follow and give the buffers back
        for layer, relu in zip(self.layers, self.relu):
            x = layer(x)
            if relu:
                x = x.relu_()  # a Linear's backward does not need its output
        return x

    def _take(self, x: torch.Tensor) -> "_Scratch":
        while self._free:
            s = self._free.pop()
            if s.fits(x):
                s.token = object()
                return s
        widths = [layer.out_features for layer in self.layers]
        return _Scratch(x, widths[:-1], max(widths), _padded(x.shape[1]))

    def _give(self, s: "_Scratch") -> None:
        if not any(f is s for f in self._free):
            self._free.append(s)


def _padded(width: int) -> int:
    return width + (-width % 8)


class _Scratch:
    """Flat buffers for the activations [B, out_i] of every layer but the last, two
    ping-pong buffers for the gradients [B, w] between layers, and the zero-padded
    input [B, in + pad] when the input width needs padding (pad columns stay zero)."""

    def __init__(self, x: torch.Tensor, widths: list[int], grad_width: int, input_width: int):
        B, kw = x.shape[0], {"dtype": x.dtype, "device": x.device}
        self.input = torch.zeros(B * input_width, **kw) if input_width != x.shape[1] else None
        self.acts = [torch.empty(B * w, **kw) for w in widths]
        self.grads = [torch.empty(B * grad_width, **kw) for _ in range(2)]
        self.capacity, self.token = B, object()

    def fits(self, x: torch.Tensor) -> bool:
        a = self.grads[0]
        return x.shape[0] <= self.capacity and x.dtype == a.dtype and x.device == a.device

    @staticmethod
    def view(buf: torch.Tensor, B: int, w: int) -> torch.Tensor:
        return buf[: B * w].view(B, w)


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner: MLP, x, *params):  # type: ignore[override]
        s, B, n = owner._take(x), x.shape[0], len(owner.layers)
        x0, w0 = x, params[0]
        if s.input is not None:
            x0 = _Scratch.view(s.input, B, _padded(x.shape[1]))
            x0[:, : x.shape[1]] = x
            w0 = nn.functional.pad(w0, (0, x0.shape[1] - x.shape[1]))
        h, acts = x0, []
        for i in range(n):
            w, b = w0 if i == 0 else params[2 * i], params[2 * i + 1]
            if i < n - 1:
                h = torch.addmm(b, h, w.t(), out=_Scratch.view(s.acts[i], B, w.shape[0]))
            else:
                h = torch.addmm(b, h, w.t())
            if owner.relu[i]:
                h.relu_()
            acts.append(h)
        ctx.owner, ctx.scratch, ctx.token, ctx.acts = owner, s, s.token, acts[:-1]
        ctx.padded = (x0, w0) if s.input is not None else None
        ctx.save_for_backward(x, acts[-1], *params)
        return acts[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        x, last, *params = ctx.saved_tensors
        s, owner = ctx.scratch, ctx.owner
        if s.token is not ctx.token:
            raise RuntimeError("MLP: this backward's buffers were reused by a later forward "
                               "(backward run twice with retain_graph after another forward)")
        x0, w0 = ctx.padded or (x, params[0])
        outs, ins, n, B, width = [*ctx.acts, last], [x0, *ctx.acts], len(owner.layers), x.shape[0], x.shape[1]
        grads: list[torch.Tensor | None] = [None] * len(params)
        gx = None
        for i in reversed(range(n)):
            if owner.relu[i]:  # in place on our own buffer; the incoming gradient is not ours
                out = g if i < n - 1 else _Scratch.view(s.grads[n % 2], B, g.shape[1])
                g = torch.ops.aten.threshold_backward.grad_input(g, outs[i], 0, grad_input=out)
            w = w0 if i == 0 else params[2 * i]
            if ctx.needs_input_grad[2 + 2 * i]:
                grads[2 * i] = g.t().mm(ins[i])[:, : width if i == 0 else None]
            if ctx.needs_input_grad[3 + 2 * i]:
                grads[2 * i + 1] = g.sum(0)
            if i > 0:
                g = torch.mm(g, w, out=_Scratch.view(s.grads[i % 2], B, w.shape[1]))
            elif ctx.needs_input_grad[1]:
                gx = g.mm(w)[:, :width]
        owner._give(s)
        return None, gx, *grads


class DotInteraction(nn.Module):
    """DLRM's interaction: dense [B, D], sparse [B, F, D] -> [B, D + (F+1)F/2], the dense
    vector then the dots of every pair i < j of the F+1 vectors (row-major upper triangle).

    The pair gradients are written into a symmetric [B, F+1, F+1] scratch matrix whose
    diagonal and unused entries stay zero between calls (no zero-fill, no fresh
    allocation), so the input gradient is a ``bmm`` (two: the sparse rows come out
    contiguous).  The Gram matrix of the forward is computed into a reused scratch
    buffer as well.  Pairs are gathered and scattered with broadcast indices.  Scratch
    buffers are plain attributes: not state, not saved.  Forward + backward at B = 4096,
    F = 26, D = 16: 17 ms here, against 22 ms with index_select / index_copy_.
    """

    def __init__(self) -> None:
        super().__init__()
        self._gram = torch.empty(0)
        self._grad = torch.empty(0)
        self._index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions [P] of the pairs i < j in an n x n matrix, and of their mirrors j > i."""
        if n not in self._index:
            i, j = torch.triu_indices(n, n, offset=1)
            self._index[n] = (i * n + j, j * n + i)
        return self._index[n]

    def scratch(self, name: str, B: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """A [B, n, n] scratch matrix, grown when needed (zeroed only when new)."""
        buf = getattr(self, name)
        if buf.shape[1:] != (n, n) or buf.shape[0] < B or buf.dtype != like.dtype:
            buf = torch.zeros(max(B, buf.shape[0] if buf.dim() == 3 else 0), n, n, dtype=like.dtype)
            setattr(self, name, buf)
        return buf[:B]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return _DotInteraction.apply(self, dense, sparse)


class _DotInteraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner: DotInteraction, dense, sparse):  # type: ignore[override]
        B, D = dense.shape
        x = torch.cat([dense.unsqueeze(1), sparse], 1)  # [B, n, D]
        n = x.shape[1]
        upper, _ = owner.indices(n)
        gram = owner.scratch("_gram", B, n, x)
        torch.bmm(x, x.transpose(1, 2), out=gram)
        out = torch.empty(B, D + upper.numel(), dtype=x.dtype)
        out[:, :D] = dense
        # gather with a broadcast index: 0.6 ms against 3.8 for index_select at B = 4096
        torch.gather(gram.view(B, n * n), 1, upper.expand(B, -1), out=out[:, D:])
        ctx.owner = owner
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        B, n, D = x.shape
        upper, lower = ctx.owner.indices(n)
        g = ctx.owner.scratch("_grad", B, n, x)  # symmetric; diagonal stays zero
        pairs = grad[:, D:]
        flat = g.view(B, n * n)
        flat.scatter_(1, upper.expand(B, -1), pairs)  # 2.7 ms for both against 6.2 with index_copy_
        flat.scatter_(1, lower.expand(B, -1), pairs)
        # d(sum_ij G_ij x_i.x_j)/dx = (G + G^T) x, G already symmetric; the sparse rows
        # come out contiguous (the lookup's backward needs them so)
        gsparse = torch.bmm(g[:, 1:], x)
        gdense = torch.bmm(g[:, :1], x).view(B, D) + grad[:, :D]
        return None, gdense, gsparse
