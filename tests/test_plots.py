"""fer_lib.plots: error bars of 95% intervals (notebook 03), tolerant of runs without intervals."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fer_lib.plots import grouped_bars, interval_errorbars, interval_yerr  # noqa: E402


def test_interval_yerr_is_the_distance_below_and_above():
    assert np.allclose(interval_yerr([0.5, 0.8], [0.4, 0.8], [0.7, 0.9]), [[0.1, 0.0], [0.2, 0.1]])


def test_error_bars_skip_points_without_an_interval():
    fig, ax = plt.subplots()
    assert interval_errorbars(ax, [0, 1, 2], [0.5, 0.6, 0.7], [0.4, np.nan, 0.6], [0.6, np.nan, 0.8]) == 2
    assert interval_errorbars(ax, [0], [0.5], [np.nan], [np.nan]) == 0
    table = pd.DataFrame({"layers": ["5", "5", "4+5"], "lambda": [0, 9, 9], "acc": [0.5, 0.6, 0.7],
                          "acc_low": [np.nan, 0.5, 0.6], "acc_high": [np.nan, 0.7, 0.8]})
    fig, ax = plt.subplots()
    grouped_bars(ax, table, "layers", "lambda", "acc", "acc_low", "acc_high")
    assert len(ax.patches) == 3 and [t.get_text() for t in ax.get_xticklabels()] == ["5", "4+5"]
    grouped_bars(plt.subplots()[1], table.drop(columns=["acc_low", "acc_high"]), "layers", "lambda", "acc",
                 "acc_low", "acc_high")  # older runs: no interval columns, plain bars
    plt.close("all")
