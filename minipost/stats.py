"""Numbers over seeds and samples: a result is a mean with its spread, never one draw.

`summarize` turns one metric's per-seed values into mean, standard deviation and range;
`seed_table` lays many metrics out as a markdown table with every seed's value beside the summary.
Used by `python -m minipost.pipeline --seeds ...` and meant for experiments that repeat a run over
seeds. `pass_at_k` is the unbiased estimator of Chen et al. 2021 for one problem, and
`mean_pass_at_k` its mean over problems with a 95% interval.
"""
import math
from typing import Mapping, Sequence


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (n − 1 in the denominator; 0 for one value), min, max and
    range (max − min) of one metric's values over seeds, with n and the values themselves."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize: no values")
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "min": min(xs), "max": max(xs),
            "range": max(xs) - min(xs), "values": xs}


def seed_table(rows: Mapping[str, Mapping[int, float | None]], seeds: Sequence[int],
               fmt: str = "{:.3f}") -> str:
    """Markdown table: one row per metric name, its mean ± sd, min–max, and each seed's value.

    `rows[name][seed]` is that seed's value (None or absent: the seed has no value, shown "–" and
    left out of the summary)."""
    head = "| metric | mean ± sd | min – max | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    lines = [head, "|" + "---|" * (3 + len(seeds))]
    for name, by_seed in rows.items():
        present = [by_seed[s] for s in seeds if by_seed.get(s) is not None]
        cells = [fmt.format(by_seed[s]) if by_seed.get(s) is not None else "–" for s in seeds]
        if present:
            st = summarize(present)
            summary = [f"{fmt.format(st['mean'])} ± {fmt.format(st['sd'])}",
                       f"{fmt.format(st['min'])} – {fmt.format(st['max'])}"]
        else:
            summary = ["–", "–"]
        lines.append("| " + " | ".join([name, *summary, *cells]) + " |")
    return "\n".join(lines) + "\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct.

    Chen et al. 2021 (arXiv 2107.03374): pass@k = 1 − C(n−c, k) / C(n, k), the chance that k
    of the n samples drawn without replacement include a correct one. Computed as the product
    C(n−c, k) / C(n, k) = ∏_{i=n−c+1}^{n} (1 − k/i), which never forms the huge binomials.
    "Any of the first k samples is correct" has the same mean over orderings but depends on the
    order the samples came in; this is its average over all orderings.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:                 # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(n: int | Sequence[int], c: Sequence[int], k: int) -> dict:
    """pass@k over problems: {"mean", "ci95", "problems"}.

    `c[j]` correct of `n` (or `n[j]`) samples on problem j. The interval is the normal
    approximation over problems, mean ± 1.96·√(Var/m) with the plug-in variance (m in the
    denominator) of the m per-problem estimates: with one sample per problem and k = 1 it is
    evaluate.ci95 of the accuracy.
    """
    ns = [n] * len(c) if isinstance(n, int) else list(n)
    if len(ns) != len(c) or not c:
        raise ValueError(f"mean_pass_at_k: {len(c)} counts for {len(ns)} sample sizes")
    xs = [pass_at_k(nj, cj, k) for nj, cj in zip(ns, c)]
    m = len(xs)
    mean = sum(xs) / m
    var = sum((x - mean) ** 2 for x in xs) / m
    return {"mean": mean, "ci95": 1.96 * math.sqrt(var / m), "problems": m}
