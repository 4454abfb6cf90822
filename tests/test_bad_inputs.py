"""The bad-input corpus (issue 10): mistakes users really make, each run in-process through the
script's real entry point (`parse_args` inside `user_errors`). Every case must end with exit code 2,
exactly one line on stderr that names the file:line or the flag and contains the manifest's
substring, no traceback, and an output directory left exactly as it was.

Cases live in tests/bad_inputs/cases.json (name, script, flags, expected substring); data files
beside it. Placeholders: {dir} this folder; {init} the tiny checkpoint; {rm} a reward model;
{other_rm} a reward model with a different vocabulary;
{no_config} {no_weights} {no_tokenizer} {bad_vocab} broken copies of {init}; {missing} a path that
does not exist; {empty_dir} an empty directory; {big_line} a JSONL with a 10 MB line (made here,
not committed).
"""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minipost.checkpoint import load_model, save_model
from minipost.model import ScoreModel
from minipost.cli import user_errors
from minipost.flags import parse_args
from minipost.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent / "bad_inputs"
CASES = json.loads((HERE / "cases.json").read_text())
FAST = {  # small built-in data, so a case that fails late still fails in well under a second
    "train_sft": ["--n-train", "64", "--eval-chats", "8", "--eval-problems", "0"],
    "train_rm": ["--n-pairs", "16", "--n-identity", "4", "--eval-problems", "8",
                 "--policy-problems", "4", "--eval-policy-problems", "4",
                 "--max-new-tokens", "16"],
    "train_dpo": ["--n-pairs", "16", "--n-identity", "4", "--eval-pairs", "8", "--eval-problems", "0"],
    "train_ppo": ["--n-prompts", "32", "--eval-problems", "0"],   # one batch of --batch-size 32
    "train_grpo": ["--n-prompts", "16", "--eval-problems", "0"],
}


@pytest.fixture(scope="module")
def places(tiny_sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    out = {"dir": str(HERE), "init": tiny_sft_dir, "missing": str(root / "does-not-exist")}
    rm = root / "rm"
    save_model(load_model(tiny_sft_dir, head="score"), rm, load_tokenizer(tiny_sft_dir))
    out["rm"] = str(rm)
    score = load_model(tiny_sft_dir, head="score")            # a reward model of another tokenizer
    save_model(ScoreModel(replace(score.config, vocab_size=score.config.vocab_size + 8)),
               root / "other_rm")
    out["other_rm"] = str(root / "other_rm")
    for name, drop in [("no_config", "config.json"), ("no_weights", "model.safetensors"),
                       ("no_tokenizer", "tokenizer.json"), ("bad_vocab", None)]:
        shutil.copytree(tiny_sft_dir, root / name)
        if drop:
            (root / name / drop).unlink()
        out[name] = str(root / name)
    tok = load_tokenizer(tiny_sft_dir)      # 40 more tokens than the model has embeddings
    tok.tok.add_tokens([f"<extra_{i}>" for i in range(40)])
    tok.save(str(root / "bad_vocab"))
    (root / "empty").mkdir()
    out["empty_dir"] = str(root / "empty")
    good = json.dumps({"messages": [{"role": "user", "content": "What is 2 + 3?"},
                                    {"role": "assistant", "content": "#### 5"}]})
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (10 << 20)},
                                    {"role": "assistant", "content": "#### 5"}]})
    (root / "big.jsonl").write_text(good + "\n" + huge + "\n")
    out["big_line"] = str(root / "big.jsonl")
    return out


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_corpus_has_at_least_30_cases_with_unique_names():
    assert len(CASES) >= 30
    assert len({c["name"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_leaves_the_output_dir_alone(case, places, tmp_path,
                                                                          capsys):
    module = __import__(case["script"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("the user's earlier results")
    before = snapshot(out)
    argv = ["--init", places["init"], "--out-dir", str(out), "--device", "cpu", "--threads", "1",
            *FAST[case["script"]], *[f.format(**places) for f in case["flags"]]]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            with user_errors():
                module.main(parse_args(module.Args, argv))
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert case["expect"] in lines[0], lines[0]
    assert snapshot(out) == before
