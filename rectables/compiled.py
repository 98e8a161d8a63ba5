"""The pooled lookup under ``torch.compile``: one custom op, so the step's graph does not
break at the lookup's host syncs (bounds, id checks) or at fbgemm's CPU kernels, which
have no fake-tensor implementation.

``rectables::pooled_lookup(values, lengths, offsets, weights, anchor, stride, width, handle)``
runs the eager lookup (checks, remap, fused TBE) and returns [B, sum D].  Its backward
runs the lookup again with autograd on and back-propagates the incoming gradient
through it, which applies the fused sparse update: the compiled step pays one extra
lookup forward (measured in BENCHMARKS.md).  ``anchor`` is a 0-size tensor that
requires grad, so autograd calls the backward.  ``handle`` names the collection and
the KJT's keys (registered in this process).
"""
from __future__ import annotations

import itertools
import weakref

import torch

_HANDLES: dict[tuple[int, tuple[str, ...]], int] = {}
_TARGETS: dict[int, tuple[weakref.ref, tuple[str, ...]]] = {}
_NEXT = itertools.count(1)


def pooled_lookup(collection, features) -> torch.Tensor:
    """[B, sum D] for ``features``, as ``collection._pooled`` gives, through the op."""
    handle = _handle(collection, tuple(features.keys()))
    return _op(features.values(), features.lengths(), features.offsets(), features.weights_or_none(),
               collection._anchor, features.stride(), sum(collection.dims), handle)


@torch.compiler.assume_constant_result  # run for real while compiling: the handle is a constant of the graph
def _handle(collection, keys: tuple) -> int:
    handle = _HANDLES.get((id(collection), keys))
    if handle is None or _TARGETS[handle][0]() is not collection:
        handle = next(_NEXT)
        _HANDLES[(id(collection), keys)] = handle
        _TARGETS[handle] = (weakref.ref(collection), keys)
    return handle


def _kjt(handle: int, values, lengths, offsets, weights, stride: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ref, keys = _TARGETS[handle]
    collection = ref()
    if collection is None:
        raise RuntimeError(f"rectables::pooled_lookup handle {handle}: its collection no longer exists")
    return collection, KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, offsets=offsets,
                                         weights=weights, stride=stride)


@torch.library.custom_op("rectables::pooled_lookup", mutates_args=())
def _op(values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
        anchor: torch.Tensor, stride: int, width: int, handle: int) -> torch.Tensor:
    collection, kjt = _kjt(handle, values, lengths, offsets, weights, stride)
    with torch.no_grad(), _autograd_dispatch():
        return collection._pooled(kjt).clone()


class _autograd_dispatch:
    """A custom op's kernel runs below autograd; fbgemm's CPU lookup is registered as an
    autograd kernel only, so it is let through for the (grad-free) forward."""

    KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther)

    def __enter__(self):
        self.prev = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in self.KEYS]
        for k in self.KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)

    def __exit__(self, *exc):
        for k, p in zip(self.KEYS, self.prev):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, p)


@_op.register_fake
def _(values, lengths, offsets, weights, anchor, stride, width, handle):
    return values.new_empty((stride, width), dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    values, lengths, offsets, weights, anchor, stride, width, handle = inputs
    ctx.save_for_backward(values, lengths, offsets, weights)
    ctx.stride, ctx.handle = stride, handle


def _backward(ctx, grad):
    values, lengths, offsets, weights = ctx.saved_tensors
    anchor_grad = _update(grad, values, lengths, offsets, weights, ctx.stride, ctx.handle)
    return None, None, None, None, anchor_grad, None, None, None


@torch.library.custom_op("rectables::pooled_lookup_update", mutates_args=())
def _update(grad: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
            weights: torch.Tensor | None, stride: int, handle: int) -> torch.Tensor:
    """The fused sparse update for ``grad`` [B, sum D]: the lookup again, with autograd,
    back-propagated.  Returns the anchor's (empty) gradient, so the graph keeps the op."""
    collection, kjt = _kjt(handle, values, lengths, offsets, weights, stride)
    with torch.enable_grad(), _autograd_dispatch():
        torch.autograd.backward(collection._pooled(kjt), grad)
    return grad.new_zeros(0)


@_update.register_fake
def _(grad, values, lengths, offsets, weights, stride, handle):
    return grad.new_zeros(0)


_op.register_autograd(_backward, setup_context=_setup)
