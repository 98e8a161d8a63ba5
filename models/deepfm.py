"""DeepFM (Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR
Prediction", IJCAI 2017): FM (first order + pairwise interactions of field embeddings)
plus a DNN over the same embeddings and the dense features.  The first-order term is a
linear map of the field embeddings and dense features, so any table method plugs in.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import mlp


class DeepFM(nn.Module):
    """forward(dense [B, Nd], sparse KJT) -> logits [B].  All features share dim D."""

    def __init__(self, embedding: nn.Module, num_dense: int, hidden: list[int]):
        super().__init__()
        dims = set(embedding.dims)
        if len(dims) != 1:
            raise ValueError(f"DeepFM needs one embedding dim for all features, got {sorted(dims)}")
        self.embedding = embedding
        F, D = len(embedding.feature_names), dims.pop()
        self.linear = nn.Linear(F * D + num_dense, 1)
        self.dnn = mlp([F * D + num_dense, *hidden, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        flat = self.embedding(sparse).values()  # [B, F*D]
        B, D = flat.shape[0], self.embedding.dims[0]
        e = flat.view(B, -1, D)
        fm = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1)
        x = torch.cat([flat, dense], 1)
        return (self.linear(x) + self.dnn(x)).squeeze(1) + fm
