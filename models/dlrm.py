"""DLRM (Naumov et al., "Deep Learning Recommendation Model for Personalization and
Recommendation Systems", 2019): bottom MLP on dense features, dot interaction with the
pooled embeddings, top MLP.  The embedding collection is passed in, never built here.

Without dense features (Avazu) the bottom MLP's output is one learned vector [D] (what
any MLP over an empty input computes), so ``dense_arch`` must then be just ``[D]``.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import DotInteraction, mlp


class DLRM(nn.Module):
    """forward(dense [B, Nd], sparse KJT) -> logits [B].  All features share dim D = dense_arch[-1]."""

    def __init__(self, embedding: nn.Module, num_dense: int, dense_arch: list[int], over_arch: list[int]):
        super().__init__()
        dims = set(embedding.dims)
        D = dense_arch[-1]
        if dims != {D}:
            raise ValueError(f"DLRM needs every embedding dim == dense_arch[-1] = {D}, got {sorted(dims)}")
        self.embedding = embedding
        F = len(embedding.feature_names)
        if num_dense == 0 and len(dense_arch) != 1:
            raise ValueError(f"without dense features DLRM's bottom MLP is one learned vector of dim D: "
                             f"dense_arch must be [{D}], got {dense_arch}")
        self.bottom = mlp([num_dense, *dense_arch]) if num_dense else None
        self.dense_vector = nn.Parameter(torch.zeros(D)) if not num_dense else None
        self.interaction = DotInteraction()
        self.top = mlp([D + (F + 1) * F // 2, *over_arch], last_activation=False)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        d = self.bottom(dense) if self.bottom is not None else self.dense_vector.expand(dense.shape[0], -1)
        e = self.embedding(sparse).values().view(d.shape[0], -1, d.shape[1])
        return self.top(self.interaction(d, e)).squeeze(1)
