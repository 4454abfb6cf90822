"""Every script's --help works and explains every flag (a help text with a bare % once broke
argparse's formatting of train_dpo.py --help), and shows the docstring's example commands line by
line."""
import dataclasses
import importlib

import pytest

from minipost.flags import parse_args


@pytest.mark.parametrize("script", ["pretrain", "train_sft", "train_rm", "train_dpo", "train_ppo",
                                    "train_grpo", "bench", "minipost.rank"])
def test_help_lists_every_flag_with_its_text(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        parse_args(module.Args, ["--help"], description=module.__doc__)
    assert exit_.value.code == 0
    raw = capsys.readouterr().out
    # the docstring's example commands keep their own lines (argparse's default reflows them)
    examples = [line for line in module.__doc__.splitlines() if line.startswith("    python")]
    assert examples, "the docstring shows how to run the script"
    for line in examples:
        assert line in raw.splitlines(), line
    out = " ".join(raw.split())
    for field in dataclasses.fields(module.Args):
        assert "--" + field.name.replace("_", "-") in out, field.name
    assert "10% of --data" in out or script != "train_dpo"
