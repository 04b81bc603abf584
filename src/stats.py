"""How sure an accuracy is: Wilson score intervals for a validation accuracy of n images; whether
one model's lead over another on the same images is more than noise (McNemar's exact test); how
well two measurements rank the same configurations (Spearman)."""
from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95%
LEAD_P = 0.05  # src/winner.py: a one-model candidate beats the ensemble only with a lead less likely than this by chance


def wilson(acc: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on n images (n = 0: (0, 1)). Unlike
    acc +- z*se it stays inside [0, 1] and is honest at 0 or 1 and at a few hundred images."""
    if n <= 0:
        return 0.0, 1.0
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def within_noise(best: float, others: dict[int, float], n: int) -> list[int]:
    """The keys of `others` whose accuracy lies inside the best one's 95% interval: on this
    validation set their order against the best is noise, not evidence."""
    low, _ = wilson(best, n)
    return [k for k, acc in others.items() if acc >= low]


def lead_p(right: list[bool], other_right: list[bool]) -> float:
    """How likely a lead at least this large is by chance: McNemar's exact test, one-sided, of the
    model whose per-image correctness is `right` against `other_right` on the same images. Only the
    images where one is right and the other wrong count; were neither better, each such image would
    go either way with even odds. 1.0 when they never disagree or `right` does not lead."""
    if len(right) != len(other_right):
        raise ValueError(f"lead_p compares the same images: {len(right)} against {len(other_right)} results")
    wins = sum(1 for a, b in zip(right, other_right) if a and not b)
    losses = sum(1 for a, b in zip(right, other_right) if b and not a)
    if wins <= losses:
        return 1.0
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n  # exact binomial tail, P(X >= wins)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties take their mean rank); None with fewer than 2 pairs or
    when either side has no spread (every configuration scored the same)."""
    from scipy.stats import spearmanr  # scipy comes with scikit-learn

    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)
