"""DLRM (Naumov et al., "Deep Learning Recommendation Model for Personalization and
Recommendation Systems", 2019): bottom MLP on dense features, dot interaction with the
pooled embeddings, top MLP.  The embedding collection is passed in, never built here.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import DotInteraction, mlp


class DLRM(nn.Module):
    """forward(dense [B, 13], sparse KJT) -> logits [B].  All features share dim D = dense_arch[-1]."""

    def __init__(self, embedding: nn.Module, num_dense: int, dense_arch: list[int], over_arch: list[int]):
        super().__init__()
        dims = set(embedding.dims)
        D = dense_arch[-1]
        if dims != {D}:
            raise ValueError(f"DLRM needs every embedding dim == dense_arch[-1] = {D}, got {sorted(dims)}")
        self.embedding = embedding
        F = len(embedding.feature_names)
        self.bottom = mlp([num_dense, *dense_arch])
        self.interaction = DotInteraction()
        self.top = mlp([D + (F + 1) * F // 2, *over_arch], last_activation=False)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        d = self.bottom(dense)
        e = self.embedding(sparse).values().view(d.shape[0], -1, d.shape[1])
        return self.top(self.interaction(d, e)).squeeze(1)
