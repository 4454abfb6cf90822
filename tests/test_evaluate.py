"""minipost.evaluate: pass@k for k = 1 … n from n samples a problem is the unbiased estimator,
not "any of the first k"; at k = n the two agree."""
import math

import pytest
import torch

from minipost import evaluate


def test_pass_at_ks_by_hand():
    # n = 3 samples; three problems with c = 0, 1 and 3 correct: n_correct = [1, 1, 0, 1]
    # pass@1 = mean(c/n) = (0 + 1/3 + 1)/3 = 4/9
    # pass@2 = mean(1 − C(n−c, 2)/C(3, 2)) = (0 + (1 − 1/3) + 1)/3 = 5/9
    # pass@3 = share with any correct = 2/3
    res = evaluate.pass_at_ks(3, torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    assert res["pass@k"] == pytest.approx([4 / 9, 5 / 9, 2 / 3])
    assert res["pass@3"] == res["pass@k"][-1]
    # pass@1's interval: per-problem values 0, 1/3, 1, plug-in variance 14/81, over m = 3
    assert res["pass@k_ci95"][0] == pytest.approx(1.96 * math.sqrt(14 / 81 / 3))


class FakeTokenizer:
    def format_chat(self, messages, add_generation_prompt=False):
        return [0], None


def test_evaluate_task_with_samples_reports_unbiased_pass_at_k(monkeypatch):
    # problem A: only its first sample is right; problem B: only its last. "Any of the first 1"
    # (the first sample's accuracy) is 1/2; the unbiased pass@1 is mean(1/3, 1/3) = 1/3
    right_a, right_b, wrong = "1 + 1 = 2\n#### 2", "2 + 2 = 4\n#### 4", "#### 7"
    texts = [right_a, wrong, wrong, wrong, wrong, right_b]
    monkeypatch.setattr(evaluate, "complete", lambda *a, **kw: texts)
    problems = [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "2 + 2?", "answer": "4"}]
    res = evaluate.evaluate_task(None, FakeTokenizer(), problems, temperature=1.0, samples=3)
    assert res["accuracy"] == 0.5 and res["n"] == 2
    # pass@2 = 1 − C(2, 2)/C(3, 2) = 2/3 for each problem; pass@3 = 1
    assert res["pass@k"] == pytest.approx([1 / 3, 2 / 3, 1.0]) and res["pass@3"] == 1.0
    assert res["pass@k_ci95"] == pytest.approx([0.0, 0.0, 0.0])   # both problems alike
