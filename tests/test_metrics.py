"""fer_lib.metrics: the 95% intervals (Wilson, percentile bootstrap, mean) reported beside every headline number."""
from __future__ import annotations

import numpy as np
import pytest

from fer_lib.metrics import (bootstrap_interval, classification_intervals, classification_metrics, macro_f1,
                             mean_interval, wilson_interval)


def test_wilson_textbook_value_and_edges():
    low, high = wilson_interval(81, 263)  # Newcombe (1998), Stat. Med. 17:857, example 81/263
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.31  # not the empty Wald interval [0, 0]
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.69 < low < 0.75
    assert wilson_interval(5, 10, level=0.99)[0] < wilson_interval(5, 10, level=0.9)[0]


def test_wilson_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p, n = 0.3, 40
    hits = [lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in rng.binomial(n, p, 2000))]
    assert 0.92 < np.mean(hits) < 0.98


@pytest.mark.parametrize("k,n,level,match", [
    (0, 0, 0.95, "n \\(number of trials\\) must be an integer >= 1"), (5, 3, 0.95, "between 0 and n=3"),
    (-1, 3, 0.95, "k .* >= 0"), (1, 3, 1.0, "strictly between 0 and 1"), (1, 3, 0, "strictly between 0 and 1"),
    (1.5, 3, 0.95, "integer"),
])
def test_wilson_bad_input_says_what_is_accepted(k, n, level, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(k, n, level)


def test_bootstrap_holds_the_statistic_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (30, 300, 3000):
        values = rng.normal(0.5, 0.2, n)
        low, high = bootstrap_interval(values)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] == pytest.approx(2 * 1.96 * 0.2 / np.sqrt(300), rel=0.25)  # ~ the normal-theory width
    values = rng.random(50)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)


def test_bootstrap_ignores_nan_and_resamples_pairs_for_macro_f1():
    values = np.array([0.2, np.nan, 0.4, 0.6, np.nan, 0.8])
    assert bootstrap_interval(values) == bootstrap_interval(values[~np.isnan(values)])
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 4, 400)
    y_pred = np.where(rng.random(400) < 0.7, y_true, rng.integers(0, 4, 400))
    f1 = macro_f1(y_true, y_pred, 4)
    assert f1 == pytest.approx(classification_metrics(y_true, y_pred, list("abcd"))["macro_f1"])
    low, high = bootstrap_interval((y_true, y_pred), lambda t, p: macro_f1(t, p, 4))
    assert low <= f1 <= high and 0.02 < high - low < 0.2
    ci = classification_intervals(y_true, y_pred, 4)
    acc = float((y_true == y_pred).mean())
    assert ci["accuracy_ci"][0] <= acc <= ci["accuracy_ci"][1] and ci["macro_f1_ci"] == [low, high]
    assert classification_intervals([], [], 4) == {"accuracy_ci": None, "macro_f1_ci": None}


@pytest.mark.parametrize("data,kwargs,match", [
    ([], {}, "no samples .*after dropping NaN"), ([np.nan, np.nan], {}, "no samples"),
    ([1.0, 2.0], {"level": 95}, "strictly between 0 and 1"), ([1.0, 2.0], {"n_boot": 0}, "n_boot must be an integer >= 1"),
    ((np.zeros(3), np.zeros(4)), {}, "one length"), (np.zeros((2, 2)), {}, "1-D"),
])
def test_bootstrap_bad_input(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_interval(data, **kwargs)


def test_mean_interval_t_and_bootstrap_ignore_nan():
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    low, high = mean_interval(values)
    assert (low + high) / 2 == pytest.approx(2.5)
    assert high - low == pytest.approx(2 * 3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-5)  # t(3) = 3.1824
    b_low, b_high = mean_interval(values, method="bootstrap")
    assert b_low <= 2.5 <= b_high
    with pytest.raises(ValueError, match="at least 2 non-NaN values"):
        mean_interval([1.0, np.nan])
    with pytest.raises(ValueError, match="t, bootstrap"):
        mean_interval(values, method="normal")


def test_interval_at_reads_new_runs_and_tolerates_old_ones():
    from fer_lib.metrics import INTERVAL_PATHS, interval_at

    record = {"test": {"accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "macro_f1_ci": None, "att_cos_ci": [0.1]}}
    paths = INTERVAL_PATHS["training"]
    assert interval_at(record, paths["accuracy"]) == (0.7, 0.9)
    assert interval_at(record, paths["macro_f1"]) is None and interval_at(record, paths["att_cos"]) is None
    assert interval_at({"test": {"accuracy": 0.8}}, paths["accuracy"]) is None  # written before intervals
