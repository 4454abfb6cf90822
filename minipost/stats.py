"""Numbers over seeds: a result is a mean with its spread, never one draw.

`summarize` turns one metric's per-seed values into mean, standard deviation and range;
`seed_table` lays many metrics out as a markdown table with every seed's value beside the summary.
Used by `python -m minipost.pipeline --seeds ...` and meant for experiments that repeat a run over
seeds.
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
