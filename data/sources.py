"""Where the shared real data sets are: a name (``gowalla``, ``movielens``, ``beauty``,
``criteo``, ``avazu``) is looked up in ``$RECTABLES_DATA``, then in ``../shared/data``
next to the working directory and next to the repository; a path is taken as it is."""
from __future__ import annotations

import os
from pathlib import Path

FOLDERS = {"gowalla": "gowalla", "movielens": "movielens-100k", "beauty": "amazon-beauty-bert4rec",
           "criteo": "criteo", "avazu": "avazu"}


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists() or name_or_path not in FOLDERS:
        return p
    roots = [os.environ.get("RECTABLES_DATA"), Path.cwd().parent / "shared" / "data",
             Path(__file__).resolve().parents[2] / "shared" / "data"]
    for root in filter(None, roots):
        if (Path(root) / FOLDERS[name_or_path]).is_dir():
            return Path(root) / FOLDERS[name_or_path]
    raise FileNotFoundError(f"data set {name_or_path!r} not found in $RECTABLES_DATA or ../shared/data; pass its "
                            f"directory instead")
