"""Full-ranking evaluation of implicit-feedback models: Recall@K and NDCG@K over all
items, each user's training items excluded, in user chunks (vectorised: one matmul and
one topk per chunk, no loop over users).

NDCG@K follows the NGCF and LightGCN papers: DCG = sum over the top K of rel / log2(rank
+ 1), divided by the ideal DCG of min(K, number of the user's test items) relevant items.
(The official NGCF code divides by another ideal and reads far higher.)  Users without
test items are skipped; the metrics are means over the rest.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _csr_rows(offsets: np.ndarray, items: np.ndarray, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in the chunk [E'], item [E']) of the given users' interactions."""
    from data.sequences import ranges

    starts = offsets[users]
    lens = offsets[users + 1] - starts
    return torch.from_numpy(np.repeat(np.arange(len(users)), lens)), torch.from_numpy(items[ranges(starts, lens)])


def recall_ndcg(users_emb: torch.Tensor, items_emb: torch.Tensor, train, test, k: int = 20,
                chunk: int = 1024) -> dict:
    """Recall@k and NDCG@k of scores users_emb [U, D] @ items_emb [I, D]^T.

    ``train`` and ``test`` are :class:`data.gowalla.Interactions` (CSR by user).  Memory
    is O(chunk x I): 1024 users x 40,981 items is 168 MB of float32 scores, in one buffer
    reused by every chunk; a top-k item is a hit where its (row, item) key is among the
    test items' (no [chunk, I] mask): Gowalla ranked in 3.3 s instead of 5.2 at D 64, 5.0
    instead of 7.0 at D 256 (interleaved medians, the same metrics)."""
    U, I = users_emb.shape[0], items_emb.shape[0]
    n_test = np.diff(test.offsets)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    ideal = torch.cumsum(discount, 0)  # ideal[m - 1]: the ideal DCG of m relevant items
    recall = ndcg = 0.0
    counted = 0
    buf = users_emb.new_empty(min(chunk, U), I)  # the scores of a chunk, reused
    with torch.no_grad():
        for lo in range(0, U, chunk):
            users = np.arange(lo, min(lo + chunk, U))
            users = users[n_test[users] > 0]
            if not len(users):
                continue
            scores = torch.matmul(users_emb[torch.from_numpy(users)], items_emb.T, out=buf[: len(users)])  # [C, I]
            r, it = _csr_rows(train.offsets, train.items, users)
            scores[r, it] = -math.inf
            top = torch.topk(scores, min(k, I), dim=1).indices  # [C, k]
            r, it = _csr_rows(test.offsets, test.items, users)  # hits: (row, item) keys of the top k among the test's
            hits = torch.isin(torch.arange(len(users))[:, None] * I + top, r * I + it).double()  # [C, k]
            m = torch.from_numpy(n_test[users]).double()
            recall += float((hits.sum(1) / m).sum())
            dcg = (hits * discount[: hits.shape[1]]).sum(1)
            ndcg += float((dcg / ideal[(m.clamp(max=k) - 1).long()]).sum())
            counted += len(users)
    return {"recall": recall / max(counted, 1), "ndcg": ndcg / max(counted, 1), "users": counted, "k": k}
