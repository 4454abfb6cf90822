"""minipost.stats: the summary of a metric over seeds and the table of many; unbiased pass@k."""
import itertools
import math

import pytest

from minipost.evaluate import ci95
from minipost.stats import mean_pass_at_k, pass_at_k, seed_table, summarize


def test_summarize_by_hand():
    # mean (0.5 + 0.7 + 0.6) / 3 = 0.6; squared deviations 0.01 + 0.01 + 0 over n − 1 = 2 -> sd 0.1
    st = summarize([0.5, 0.7, 0.6])
    assert st["mean"] == pytest.approx(0.6) and st["sd"] == pytest.approx(0.1)
    assert (st["min"], st["max"], st["n"]) == (0.5, 0.7, 3)
    assert st["range"] == pytest.approx(0.2) and st["values"] == [0.5, 0.7, 0.6]


def test_summarize_one_value_has_no_spread_and_none_is_an_error():
    assert summarize([0.3])["sd"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_seed_table_shows_summary_and_each_seed_and_skips_missing_values():
    table = seed_table({"sft: after": {0: 0.5, 1: 0.7, 2: 0.6}, "rm: after": {0: 0.9, 2: None}},
                       seeds=[0, 1, 2])
    lines = table.splitlines()
    assert lines[0] == "| metric | mean ± sd | min – max | seed 0 | seed 1 | seed 2 |"
    assert lines[2] == "| sft: after | 0.600 ± 0.100 | 0.500 – 0.700 | 0.500 | 0.700 | 0.600 |"
    # one value: sd 0; the seeds without a value show "–" and are left out of the summary
    assert lines[3] == "| rm: after | 0.900 ± 0.000 | 0.900 – 0.900 | 0.900 | – | – |"
    assert not math.isnan(summarize([1.0, 1.0])["sd"])


def test_pass_at_k_by_hand():
    # n=5, c=2, k=2: 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # k = 1 is the share of correct samples: 3/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)
    # n=200, c=1, k=100: C(199,100)/C(200,100) = 100/200, so 0.5
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)
    # no correct sample: 0; fewer wrong samples (1) than k (2): every pick of 2 holds a correct one
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 4, 2) == 1.0


def test_pass_at_k_matches_the_binomials_where_they_fit_and_stays_finite_where_they_do_not():
    for n, c, k in [(20, 7, 5), (50, 1, 10), (100, 30, 64)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert 0 < pass_at_k(5000, 3, 40) < 1     # C(5000, 40) ~ 1e100: the product never forms it


def test_pass_at_k_is_any_of_the_first_k_averaged_over_orderings_not_one_ordering():
    # samples [1, 0, 0, 0] (one correct of n=4), k=2: 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5
    samples = [1, 0, 0, 0]
    first_k = [max(order[:2]) for order in itertools.permutations(samples)]
    assert pass_at_k(4, 1, 2) == pytest.approx(sum(first_k) / len(first_k)) == pytest.approx(0.5)
    # "any of the first k" on the order they came in says 1 here, and 0 for [0, 0, 0, 1]
    assert max(samples[:2]) == 1 and max([0, 0, 0, 1][:2]) == 0
    # k = n: the two agree (pass@n is "any correct")
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_by_hand_and_at_k_1_its_interval_is_the_accuracy_interval():
    # problems with 2 of 4 and 0 of 4 correct, k=2: 1 − C(2,2)/C(4,2) = 5/6 and 0 -> mean 5/12;
    # plug-in variance ((5/12)² + (5/12)²) / 2 = 25/144 -> ci95 = 1.96 · (5/12) / √2
    res = mean_pass_at_k(4, [2, 0], 2)
    assert res["mean"] == pytest.approx(5 / 12) and res["problems"] == 2
    assert res["ci95"] == pytest.approx(1.96 * (5 / 12) / math.sqrt(2))
    # one sample per problem, k = 1: 0/1 outcomes, the interval of a proportion
    c = [1, 0, 1, 1, 0, 0, 1, 1]
    res = mean_pass_at_k(1, c, 1)
    assert res["mean"] == pytest.approx(5 / 8) and res["ci95"] == pytest.approx(ci95(5 / 8, 8))
    # sample sizes may differ per problem
    assert mean_pass_at_k([2, 4], [1, 1], 1)["mean"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    with pytest.raises(ValueError):
        mean_pass_at_k([2, 4], [1], 1)
