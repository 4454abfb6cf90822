"""bench.py and bench_common.py: the FLOP counter against a hand count, and every workload runs
(tiny, one step).

Not timing tests: they only check that the benchmark runs and reports sane numbers, so it never rots.
"""
import json
import math
import os
import subprocess
import sys

import pytest

import bench
import bench_common
from minipost.model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAND = GPTConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)


def test_non_embedding_params_hand_count_and_model():
    # per layer: q 8·8=64, k 8·4=32, v 32, o 64 -> 192; SwiGLU 3·8·16 = 384; two norms 2·8 = 16
    # -> 592; two layers 1184; final norm 8 -> 1192
    assert bench_common.non_embedding_params(HAND) == 1192
    model = GPT(HAND)
    assert bench_common.non_embedding_params(HAND) == model.num_params()  # tied head: counted once, as embedding


def test_flops_per_token_matches_hand_count():
    # train at T=5: 6·1192 + 12·L·d·T (12·2·8·5 = 960) + 6·V·d (6·10·8 = 480) = 7152 + 960 + 480
    assert bench_common.flops_per_token(HAND, 5) == 8592
    assert bench_common.flops_per_token(HAND, 5, train=False) == 8592 // 3 == 2864
    # score head (1 output): 7152 + 960 + 6·1·8
    assert bench_common.flops_per_token(HAND, 5, head_size=1) == 8160


def test_generation_flops_is_prefill_plus_each_decode_step():
    # B=2, P=3, 3 new tokens: prefill 2·3 tokens at T=3, then decode steps at contexts 4 and 5
    f = lambda T: bench_common.flops_per_token(HAND, T, train=False)  # noqa: E731
    assert bench_common.generation_flops(HAND, 2, 3, 3) == 6 * f(3) + 2 * f(4) + 2 * f(5)


def test_w0_one_step_from_the_command_line():
    out = subprocess.run([sys.executable, "bench.py", "--workload", "W0", "--steps", "1",
                          "--warmup", "0", "--json", "--threads", "1", "--tiny"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ceiling, loop = result["rows"]
    assert ceiling["unit"] == "GFLOP/s" and ceiling["throughput"] > 0
    assert loop["unit"] == "tok/s" and 0 < loop["flops_per_s"] < 10 * ceiling["flops_per_s"]
    assert result["peak_rss_mb"] > 0


@pytest.mark.parametrize("workload,precompute", [("W1", False), ("W2", False), ("W3", False),
                                                 ("W3", True), ("W4", False), ("W5", False)])
def test_each_workload_runs_tiny(workload, precompute):
    args = bench.Args(workload=workload, json=True, steps=1, warmup=0, tiny=True, threads=1,
                      precompute_ref=precompute, grad_checkpointing=workload in ("W2", "W5"))
    result = bench.run_workload(args)
    assert result["workload"] == workload and result["rows"]
    for row in result["rows"]:
        assert math.isfinite(row["throughput"]) and row["throughput"] > 0
        assert row["flops_per_s"] > 0 and row["step_s"] > 0
    if workload == "W4":
        assert [r["unit"] for r in result["rows"]] == ["new tok/s", "new tok/s"]
    if workload == "W5":
        assert set(result["rows"][0]["phases_s"]) == {"generate", "score", "train"}


def test_floors_run_tiny_and_bound_mfu_by_the_ceiling(capsys):
    args = bench.Args(workload="floors", steps=1, warmup=0, tiny=True, threads=1)
    result = bench.main(args)
    names = [r["name"] for r in result["rows"]]
    assert names[0].startswith("matmul") and names[-1].startswith("W4 matmuls")
    bounds = [r for r in result["rows"] if "mfu" in r]
    assert [r["name"][:2] for r in bounds] == ["W1", "W2"]
    cfg, ceiling = bench_common.bench_config(tiny=True), result["rows"][0]["flops_per_s"]
    model_flops = [16 * 256 * bench_common.flops_per_token(cfg, 256),               # W1: SFT 16 × 256
                   32 * 128 * bench_common.flops_per_token(cfg, 128, head_size=1)]  # W2: RM 32 × 128
    for r, flops in zip(bounds, model_flops):
        matmuls, attention = result["rows"][result["rows"].index(r) - 2:][:2]
        assert r["step_s"] == pytest.approx(matmuls["step_s"] + attention["step_s"])
        assert r["mfu"] == pytest.approx(flops / r["step_s"] / ceiling)
        assert r["budget_80_s"] == pytest.approx(flops / (0.8 * ceiling))
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| floor | time | throughput |" and len(table) == 2 + len(names)
    with pytest.raises(bench.UserError, match="floors"):
        bench.main(bench.Args(workload="floors", impl="trl"))


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["W1", "W4"])
def test_compile_path_runs_tiny(workload):
    # torch.compile through the written-out autograd Functions (training) and the decoding loop
    # with its growing cache (dynamic shapes): ~25 s each, mostly compilation.
    out = subprocess.run([sys.executable, "bench.py", "--workload", workload, "--steps", "1",
                          "--warmup", "1", "--json", "--threads", "1", "--tiny", "--compile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert rows and all(r["throughput"] > 0 for r in rows)


def test_table_has_mfu_against_the_w0_ceiling_and_ratios():
    def run(rows):
        return {"rows": rows, "peak_rss_mb": 500.0}
    ceiling = {"name": "matmul", "step_s": 0.01, "throughput": 100.0, "unit": "GFLOP/s",
               "flops_per_s": 100e9, "ceiling": True}
    loop = {"name": "SFT", "step_s": 0.5, "throughput": 4000.0, "unit": "tok/s", "flops_per_s": 80e9}
    slower = dict(loop, throughput=2000.0)
    busy = dict(ceiling, throughput=50.0, flops_per_s=50e9)   # a W0 run on a busy machine
    results = {(("W0",), "minipost"): [run([ceiling])], (("W0",), "trl"): [run([busy])],
               (("W1",), "minipost"): [run([loop])], (("W1",), "trl"): [run([slower])]}
    text = bench.table(results, ["minipost", "trl"])
    lines = text.splitlines()
    assert lines[0].startswith("| workload | what |") and len(lines) == 4
    assert "80%" in lines[3] and "2.00×" in lines[3] and "4,000 tok/s" in lines[3]   # of 100e9
    results[(("W0",), "trl")] = [run([dict(ceiling, flops_per_s=160e9)])]   # the faster one counts
    assert "50%" in bench.table(results, ["minipost", "trl"]).splitlines()[3]


def test_compare_trl_without_trl_prints_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)      # `import trl` fails, installed or not
    assert bench.main(bench.Args(compare="trl")) == {}
    assert "pip install trl transformers" in capsys.readouterr().out


@pytest.mark.parametrize("workload", ["W0", "W1", "W4"])
def test_trl_side_runs_tiny(workload):
    """The comparison's own side (bench_trl.py): CI installs TRL, a test-only reference."""
    args = bench.Args(workload=workload, impl="trl", json=True, steps=1, warmup=0, tiny=True,
                      threads=1, grad_checkpointing=workload == "W0")
    result = bench.run_workload(args)
    assert result["impl"] == "trl" and all(r["throughput"] > 0 for r in result["rows"])
