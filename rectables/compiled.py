"""The pooled lookup under ``torch.compile``: one custom op, so the step's graph does not
break at the lookup's host syncs (bounds, id checks) or at fbgemm's CPU kernels, which
have no fake-tensor implementation.

``rectables::pooled_lookup(values, lengths, offsets, weights, anchor, stride, width,
handle, train) -> (out [B, sum D], token)`` runs the eager lookup (checks, remap, fused
TBE).  With ``train`` it records the lookup's autograd graph and keeps it under
``token``; its backward, ``rectables::pooled_lookup_update(grad, token)``, back-propagates
through that graph, which applies the fused sparse update, and returns the (empty)
gradient of ``anchor``: a 0-size tensor that requires grad, so that autograd calls the
backward and the compiled graph keeps the update.  ``handle`` names the collection and
the KJT's keys (registered in this process).  A lookup whose backward never runs keeps
its graph until ``_PENDING`` newer ones push it out.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from rectables.traceable import Handles

_COLLECTIONS = Handles("collection")  # (collection, the KJT's keys)
_TOKENS = itertools.count(1)
_GRAPHS: OrderedDict[int, torch.Tensor] = OrderedDict()  # token -> lookup output with its graph
_PENDING = 64


def pooled_lookup(collection, features) -> torch.Tensor:
    """[B, sum D] for ``features``, as ``collection._pooled`` gives, through the op."""
    handle = _handle(collection, tuple(features.keys()))
    out, _ = _op(features.values(), features.lengths(), features.offsets(), features.weights_or_none(),
                 collection._anchor, features.stride(), sum(collection.dims), handle, torch.is_grad_enabled())
    return out


@torch.compiler.assume_constant_result  # run for real while compiling: the handle is a constant of the graph
def _handle(collection, keys: tuple) -> int:
    return _COLLECTIONS.handle(collection, keys)


class _autograd_dispatch:
    """A custom op's kernel runs below autograd; fbgemm's CPU lookup is registered as an
    autograd kernel only, and the update needs the lookup's graph: let autograd through."""

    KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther)

    def __enter__(self):
        self.prev = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in self.KEYS]
        for k in self.KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)

    def __exit__(self, *exc):
        for k, p in zip(self.KEYS, self.prev):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, p)


@torch.library.custom_op("rectables::pooled_lookup", mutates_args=())
def _op(values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
        anchor: torch.Tensor, stride: int, width: int, handle: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    collection, keys = _COLLECTIONS.get(handle)
    kjt = KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, offsets=offsets, weights=weights,
                            stride=stride)
    with torch.set_grad_enabled(train), _autograd_dispatch():
        out = collection._pooled(kjt)
    token = 0
    if train:
        token = next(_TOKENS)
        _GRAPHS[token] = out
        while len(_GRAPHS) > _PENDING:
            _GRAPHS.popitem(last=False)
    return out.detach(), torch.tensor(token)


@_op.register_fake
def _(values, lengths, offsets, weights, anchor, stride, width, handle, train):
    return values.new_empty((stride, width), dtype=torch.float32), values.new_empty((), dtype=torch.int64)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def _backward(ctx, grad, _):
    (token,) = ctx.saved_tensors
    return None, None, None, None, _update(grad, token), None, None, None, None


@torch.library.custom_op("rectables::pooled_lookup_update", mutates_args=())
def _update(grad: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The fused sparse update for ``grad`` [B, sum D]; returns the anchor's empty gradient."""
    out = _GRAPHS.pop(int(token), None)
    if out is None:
        raise RuntimeError(f"the compiled lookup's graph {int(token)} is gone: it ran a second backward, or more "
                           f"than {_PENDING} lookups ran after it without one")
    with torch.enable_grad(), _autograd_dispatch():
        torch.autograd.backward(out, grad)
    return grad.new_zeros(0)


@_update.register_fake
def _(grad, token):
    return grad.new_zeros(0)


_op.register_autograd(_backward, setup_context=_setup)
