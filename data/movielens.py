"""MovieLens-100k as a CTR task (the protocol of the Unified Embedding tutorial of
TensorFlow Recommenders): label = rating >= 3; features movie_id, user_id, gender,
zip code, occupation and bucketized age; ids made contiguous per feature (0..n-1).

Reads ``u.data`` and ``u.user`` in place (the data may not be redistributed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = ["movie_id", "user_id", "gender", "zip_code", "occupation", "age_bucket"]
AGE_EDGES = [18, 25, 35, 45, 50, 56]  # buckets as in TFDS' bucketized_user_age


def load_movielens(folder: str | Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """-> ids int64 [R, 6] (contiguous per feature), labels float32 [R], ids per feature."""
    folder = Path(folder)
    ratings = pd.read_csv(folder / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    users = pd.read_csv(folder / "u.user", sep="|", names=["user", "age", "gender", "occupation", "zip"], dtype={"zip": str})
    df = ratings.merge(users, on="user", how="left", validate="many_to_one")
    if df["age"].isna().any():
        raise ValueError(f"{folder / 'u.data'}: ratings of users missing from u.user")
    raw = [df["item"], df["user"], df["gender"], df["zip"], df["occupation"], np.digitize(df["age"], AGE_EDGES)]
    cols, cards = [], []
    for values in raw:
        codes, uniques = pd.factorize(pd.Series(values), sort=True)
        cols.append(codes.astype(np.int64))
        cards.append(len(uniques))
    return np.stack(cols, 1), (df["rating"].to_numpy() >= 3).astype(np.float32), cards
