"""Building blocks: MLP and the DLRM dot interaction."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], last_activation: bool = True) -> nn.Sequential:
    """Linear layers sizes[0] -> ... -> sizes[-1] with ReLU between (and after, if asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """dense [B, D], sparse [B, F, D] -> [B, D + (F+1)F/2]: dense and the pairwise dots i<j."""
    x = torch.cat([dense.unsqueeze(1), sparse], 1)  # [B, F+1, D]
    z = torch.bmm(x, x.transpose(1, 2))  # [B, F+1, F+1]
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    return torch.cat([dense, z[:, i, j]], 1)
