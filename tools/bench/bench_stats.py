"""Summary statistics of benchmark repeats: the median, and the paired ratio of two loops with a bootstrap
confidence interval and a verdict against a goal."""
from __future__ import annotations

import statistics


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(numerators: list[float], denominators: list[float], confidence: float = 0.95,
                 resamples: int = 4000, seed: int = 0) -> dict:
    """Median of the per-repeat ratios numerator_i / denominator_i and a bootstrap confidence interval of
    that median (percentile method, repeats resampled with replacement). Pairing cancels the drift that
    a shared machine adds to both runs of one repeat."""
    import random

    ratios = [a / b for a, b in zip(numerators, denominators)]
    if not ratios:
        return {"ratios": [], "median": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = medians[int(tail * (resamples - 1))]
    high = medians[int(round((1 - tail) * (resamples - 1)))]
    return {"ratios": ratios, "median": statistics.median(ratios), "low": low, "high": high,
            "confidence": confidence}


def verdict(interval: dict, goal: float) -> str:
    """'met' when the whole interval is at or under the goal, 'missed' when it is all above, else 'undecided'."""
    if interval["high"] <= goal:
        return "met"
    if interval["low"] > goal:
        return "missed"
    return "undecided (more repeats, or an idle machine)"
