"""minipost.stats: the summary of a metric over seeds and the table of many."""
import math

import pytest

from minipost.stats import seed_table, summarize


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
