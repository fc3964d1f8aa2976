"""Confidence intervals for the extensions' accuracies (notebooks 05-07): a test set of n faces gives an
accuracy k/n whose 95% Wilson score interval says how far it could move with other faces.

`wilson_interval` is fer_lib.metrics' when that module has one (issue 19 adds it), else the same
formula here, so the extensions do not wait on it. `accuracy_with_interval` packs an accuracy and its
interval for tables and metrics.json.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

try:  # the project's one implementation, once present
    from fer_lib.metrics import wilson_interval  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the merge order of issue 19's branches

    def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
        """Wilson score interval of a proportion k/n (stays in [0, 1]; not empty at k = 0 or n)."""
        if n < 1 or not 0 <= k <= n or not 0.0 < level < 1.0:
            raise ValueError(f"need n >= 1, 0 <= k <= n and 0 < level < 1, got k={k}, n={n}, level={level}")
        z = NormalDist().inv_cdf(0.5 + level / 2)
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def accuracy_with_interval(correct: int, n: int, level: float = 0.95) -> dict[str, Any]:
    """{"accuracy", "ci_low", "ci_high", "n"}: k/n with its Wilson interval (NaN when n = 0)."""
    if n == 0:
        return {"accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    low, high = wilson_interval(int(correct), int(n), level)
    return {"accuracy": correct / n, "ci_low": float(low), "ci_high": float(high), "n": int(n)}
