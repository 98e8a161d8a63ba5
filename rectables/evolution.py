"""Evolutionary search over one dim per feature, as OptEmbed searches its supernet (Lyu et
al., CIKM 2022, after Guo et al., "Single Path One-Shot Neural Architecture Search with
Uniform Sampling", ECCV 2020).

A candidate is a tuple of F dims.  Round 1 scores ``population`` candidates: all features
at the largest dim, the others drawn uniformly.  Every later round scores ``mutations``
children (a copy of a random parent with each dim redrawn with probability ``prob``; the
parent itself is never changed) and ``crossovers`` children (two parents, cut at a random
feature between 1 and F - 1: the first's dims before it, the second's after).  Parents
are the ``parents`` best candidates scored so far, so the best fitness never falls from
one round to the next.  A candidate met again is not scored again.  Seeded: the same
seed and fitness give the same rounds.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable


def evolve(fitness: Callable[[list[int]], float], num_fields: int, candidates: list[int], population: int = 20,
           mutations: int = 10, crossovers: int = 10, rounds: int = 30, prob: float = 0.1, parents: int = 15,
           seed: int = 0, log: Callable[[dict], None] | None = None) -> dict:
    """Search; returns {dims, fitness, history: one record per round (round, best, mean of
    the round's candidates, best_dims, scored)}.  ``log`` is called with each record."""
    if num_fields < 1 or not candidates or min(population, rounds, parents) < 1 or mutations + crossovers < 1:
        raise ValueError("need num_fields, candidates, population, rounds, parents >= 1 and some children per round")
    if not 0 <= prob <= 1:
        raise ValueError(f"mutation probability must lie in [0, 1], got {prob}")
    rng, cands = random.Random(seed), sorted(set(candidates))
    scores: dict[tuple, float] = {}
    pop = [tuple([cands[-1]] * num_fields)]
    pop += [tuple(rng.choice(cands) for _ in range(num_fields)) for _ in range(population - 1)]
    history = []
    for r in range(1, rounds + 1):
        fits = []
        for c in pop:
            if c not in scores:
                scores[c] = float(fitness(list(c)))
            fits.append(scores[c])
        top = sorted(scores, key=lambda c: (-scores[c], c))[:parents]
        record = {"round": r, "best": scores[top[0]], "mean": statistics.mean(fits), "best_dims": list(top[0]),
                  "scored": len(scores)}
        history.append(record)
        if log:
            log(record)
        pop = [tuple(rng.choice(cands) if rng.random() < prob else d for d in rng.choice(top))
               for _ in range(mutations)]
        for _ in range(crossovers):
            a, b = rng.sample(top, 2) if len(top) > 1 else (top[0], top[0])
            cut = rng.randint(1, num_fields - 1) if num_fields > 1 else 1
            pop.append(a[:cut] + b[cut:])
    best = min(scores, key=lambda c: (-scores[c], c))
    return {"dims": list(best), "fitness": scores[best], "history": history}
