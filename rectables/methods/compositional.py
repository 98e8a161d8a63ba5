"""``compositional``: compositional embeddings from complementary partitions (Shi et al.,
"Compositional Embeddings Using Complementary Partitions for Memory-Efficient
Recommendation Systems", KDD 2020).

Id x in [0, n) is split into k digits, each selecting a row of a small table; the rows
are combined by ``add``, ``mult`` (element-wise, per id, before pooling) or ``concat``.
Partitions (integer arithmetic only, exact for every int64 id):

- ``qr``: (x mod m, x div m), tables of m and ceil(n / m) rows;
- ``mixed_radix``: digits of x in radices m_1..m_k (product >= n);
- ``crt``: (x mod p_1, ..., x mod p_k), pairwise coprime p_j with product >= n.

Each partition gives every id in [0, n) a distinct tuple of rows (checked at
construction).  With ``add`` the k tables are stacked into one physical table (rows of
table j offset by the sizes before it), so a pooled lookup is one bag of all k rows of
every id.  Tables of at most ``threshold`` ids stay plain.  Raw unbounded ids:
``hash_ids=True`` hashes them into [0, n) first (seeded, like ``hash``).
"""
from __future__ import annotations

import math

import torch

from rectables import hashing
from rectables.registry import register
from rectables.table import Table, check_range

PARTITIONS = ("qr", "mixed_radix", "crt")
_COMBINE = {"add": "sum", "mult": "mult", "concat": "concat"}


def partition_sizes(kind: str, moduli: list[int], n: int) -> list[int]:
    """Rows of each table; raises if the partition cannot tell all n ids apart."""
    if kind not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {kind!r}")
    if not moduli or min(moduli) < 1:
        raise ValueError(f"moduli must be >= 1, got {moduli}")
    if kind == "qr":
        if len(moduli) != 1:
            raise ValueError(f"qr takes one modulus m, got {moduli}")
        return [moduli[0], -(-n // moduli[0])]
    if math.prod(moduli) < n:
        raise ValueError(f"{kind}: product of moduli {moduli} = {math.prod(moduli)} < {n} ids; ids would collide")
    if kind == "crt":
        for i, a in enumerate(moduli):
            for b in moduli[i + 1 :]:
                if math.gcd(a, b) != 1:
                    raise ValueError(f"crt: moduli {a} and {b} are not coprime")
    return list(moduli)


def partition(x: torch.Tensor, kind: str, moduli: list[int], id_major: bool = False) -> torch.Tensor:
    """Ids [N] in [0, n) -> digits [k, N] (rows of the k tables).  ``id_major``: stored id
    by id (the transpose of a contiguous [N, k]), so that a pooled add lookup reads each
    id's k rows side by side without a copy."""
    if kind == "qr":
        digits = [x % moduli[0], torch.div(x, moduli[0], rounding_mode="floor")]
    elif kind == "crt":
        digits = [x % p for p in moduli]
    else:
        digits, rest = [], x
        for m in moduli:
            digits.append(rest % m)
            rest = torch.div(rest, m, rounding_mode="floor")
    return torch.stack(digits, dim=1).t() if id_major else torch.stack(digits)


@register
class CompositionalTable(Table):
    """k small tables per feature set, combined per id by add / mult / concat."""

    method = "compositional"
    size_arg = "num_ids"
    raw_ids = False  # ids in [0, n); raw ids with hash_ids=True

    def __init__(
        self,
        name: str,
        embedding_dim: int,
        feature_names: list[str],
        num_ids: int,
        partition: str = "qr",
        moduli: list[int] | None = None,
        combine: str = "mult",
        threshold: int = 200,
        hash_ids: bool = False,
        seed: int = 0,
        pooling: str = "sum",
    ) -> None:
        super().__init__(name, embedding_dim, feature_names, pooling)
        if num_ids <= 0:
            raise ValueError(f"table {name!r}: num_ids must be > 0, got {num_ids}")
        if combine not in _COMBINE:
            raise ValueError(f"table {name!r}: combine must be one of {list(_COMBINE)}, got {combine!r}")
        self.num_ids, self.kind, self.hash_ids = int(num_ids), partition, hash_ids
        self.plain = self.num_ids <= threshold
        self.moduli = list(moduli) if moduli else [math.ceil(math.sqrt(self.num_ids))]
        self.sizes = [self.num_ids] if self.plain else partition_sizes(partition, self.moduli, self.num_ids)
        k = len(self.sizes)
        if combine == "concat" and not self.plain and embedding_dim % k:
            raise ValueError(f"table {name!r}: concat needs embedding_dim divisible by {k} tables")
        self.combine_kind = combine
        self.combine = "concat" if self.plain else _COMBINE[combine]
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("keys", torch.tensor([hashing.salt_key(seed, f) for f in range(len(feature_names))]))
        if self.stacked:  # first row of each of the k tables inside the stacked one [k, 1]
            self._starts = torch.tensor([sum(self.sizes[:j]) for j in range(len(self.sizes))]).unsqueeze(1)

    @classmethod
    def for_budget(cls, name, embedding_dim, feature_names, num_ids, fraction, seed=0):
        """Quotient-remainder with m = ceil(1/fraction): m + n/m rows ~ fraction * n, combined by mult."""
        if fraction >= 1:
            return cls(name, embedding_dim, feature_names, num_ids, threshold=num_ids, seed=seed)
        return cls(name, embedding_dim, feature_names, num_ids, "qr", [math.ceil(1 / fraction)], seed=seed)

    @property
    def stacked(self) -> bool:
        """True if the k tables share one physical table (``add``)."""
        return self.combine == "sum"

    def physical_shapes(self) -> list[tuple[int, int]]:
        if self.stacked:
            return [(sum(self.sizes), self.embedding_dim)]
        d = self.embedding_dim // len(self.sizes) if self.combine == "concat" else self.embedding_dim
        return [(m, d) for m in self.sizes]

    def feature_lanes(self, f: int) -> list[int]:
        return [0] * len(self.sizes) if self.stacked else list(range(len(self.sizes)))

    def init_bound(self, k: int) -> float:
        """Symmetric U(-b, b) for partition table k (each range of the stacked table for
        add).  For mult, b = n^(-1/(2K)) so that a product of K rows has
        the spread of a plain table's U(-sqrt(1/n), sqrt(1/n)) (the reference draws from
        [sqrt(1/n), 1], all positive, which biases mult)."""
        if self.combine == "mult":
            return self.num_ids ** (-1.0 / (2 * len(self.sizes)))
        return math.sqrt(1.0 / self.sizes[k])

    def init_weight_(self, k: int, weight: torch.Tensor) -> None:
        """Each of the k tables U(-b_j, b_j), also where they are stacked."""
        if not self.stacked:
            return super().init_weight_(k, weight)
        for j, rows in enumerate(weight.split(self.sizes)):
            rows.uniform_(-self.init_bound(j), self.init_bound(j))

    def init_rows_(self, k: int, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Each row from its own partition table's range, also where they are stacked."""
        if not self.stacked or self.init_fn is not None:
            return super().init_rows_(k, rows, out)
        ends = torch.tensor(self.sizes).cumsum(0)
        bounds = torch.tensor([self.init_bound(j) for j in range(len(self.sizes))])
        b = bounds[torch.searchsorted(ends, rows, right=True)].unsqueeze(1)
        out.uniform_(-1, 1).mul_(b)

    def remap(self, values: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        if self.hash_ids:
            key = self.keys[0] if len(counts) == 1 else self.keys.repeat_interleave(torch.tensor(counts), output_size=values.numel())
            values = hashing.bucket(values, key, self.num_ids)
        else:  # raw ids need hash_ids=True
            check_range(self, values, counts, self.num_ids)
        rows = values.unsqueeze(0) if self.plain else partition(values, self.kind, self.moduli, self.stacked)
        if self.stacked:
            rows = rows + self._starts
        return self.per_feature(rows, counts)
