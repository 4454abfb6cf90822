"""Reward functions with the mistakes users make, for the bad-input corpus (cases.json)."""


def raises(prompts, completions, **kwargs):
    return [len(c) / 0 for c in completions]


def wrong_count(prompts, completions, **kwargs):
    return [1.0] + [0.0] * len(completions)


def returns_nan(prompts, completions, **kwargs):
    return [float("nan") for _ in completions]


def needs_tests(prompts, completions, tests, **kwargs):
    return [float(all(t in c for t in ts)) for c, ts in zip(completions, tests)]
