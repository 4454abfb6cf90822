"""flags.py: shared flags declared once (and explained in --help), allowed values from the types
and checked in one place, so the command line and `main(Args(...))` stop with the same error."""
import dataclasses
import importlib
import inspect
import typing

import pytest
import torch

from minipost.cli import user_errors
from minipost.errors import UserError
from minipost.flags import RunArgs, StageArgs, check_args, literal_values, parse_args

SCRIPTS = ["train_sft", "train_rm", "train_dpo", "train_ppo", "train_grpo"]


def literal_fields(module):
    hints = typing.get_type_hints(module.Args)
    return [(f.name, literal_values(hints[f.name])) for f in dataclasses.fields(module.Args)
            if literal_values(hints[f.name])]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_literal_flag_refuses_a_bad_value_alike_from_the_command_line_and_from_main(
        script, tmp_path, capsys):
    module = importlib.import_module(script)
    fields = literal_fields(module)
    assert {"dtype", "peft", "chat_template"} <= {name for name, _ in fields}
    for name, allowed in fields:
        out = tmp_path / name
        argv = ["--out-dir", str(out), "--device", "cpu", "--" + name.replace("_", "-"), "nope"]
        with pytest.raises(SystemExit) as exit_:
            with user_errors():
                module.main(parse_args(module.Args, argv))
        assert exit_.value.code == 2
        cli_error = capsys.readouterr().err.strip()
        with pytest.raises(UserError) as from_main:
            module.main(module.Args(out_dir=str(out), device="cpu", **{name: "nope"}))
        assert cli_error == f"error: {from_main.value}"
        assert str(from_main.value).startswith(f"--{name.replace('_', '-')} 'nope': expected one of")
        assert all(str(a) in str(from_main.value) for a in allowed if a)
        assert not out.exists()                              # stopped before writing anything


@pytest.mark.parametrize("script", SCRIPTS + ["pretrain"])
def test_shared_flags_are_inherited_and_explained_in_help(script, capsys):
    module = importlib.import_module(script)
    base = RunArgs if script == "pretrain" else StageArgs
    assert issubclass(module.Args, base)
    with pytest.raises(SystemExit):
        parse_args(module.Args, ["--help"], description=module.__doc__)
    out = " ".join(capsys.readouterr().out.split())
    assert "resume checkpoints kept in OUT_DIR/checkpoints" in out      # RunArgs' comment
    if base is StageArgs:
        assert "--peft {none,lora,adapter}" in out and "LoRA rank r" in out
    # the script's own flags come before the shared ones
    own = next(iter(inspect.get_annotations(module.Args)))
    assert out.index("--" + own.replace("_", "-") + " ") < out.index("--seed SEED")


def test_a_subclass_may_change_a_shared_default_and_its_help():
    import train_ppo
    assert train_ppo.Args().save_every == 50 and StageArgs().save_every == 100
    assert parse_args(train_ppo.Args, []).save_every == 50


def test_optional_flags_take_none_and_numbers():
    import train_grpo
    import train_ppo
    assert train_ppo.Args().value_lam is None
    assert parse_args(train_ppo.Args, ["--value-lam", "1"]).value_lam == 1.0
    assert parse_args(train_ppo.Args, ["--value-lam", "none"]).value_lam is None
    assert parse_args(train_grpo.Args, []).clip_eps_high == 0.28
    assert parse_args(train_grpo.Args, ["--clip-eps-high", "none"]).clip_eps_high is None


def test_check_args_reads_the_allowed_values_from_the_type():
    @dataclasses.dataclass
    class Args(StageArgs):
        mode: typing.Literal["a", "b"] = "a"     # a | b

    check_args(Args())
    with pytest.raises(UserError, match="--mode 'c': expected one of a, b"):
        check_args(Args(mode="c"))
    with pytest.raises(UserError, match="--chat-template 'x': expected one of '', chatml"):
        check_args(Args(chat_template="x"))
    with pytest.raises(UserError, match="--merge needs --peft lora"):
        check_args(Args(merge=True))


def test_the_old_sentinel_values_are_refused_not_reinterpreted(tmp_path):
    """`--value-lam -1` meant "use --lam" and `--clip-eps-high 0` "use --clip-eps"; `none` says
    that now, and the old spellings stop with a message naming it."""
    import train_grpo
    import train_ppo
    with pytest.raises(UserError, match=r"--value-lam .*none"):
        train_ppo.main(train_ppo.Args(out_dir=str(tmp_path / "o"), device="cpu", value_lam=-1.0))
    with pytest.raises(UserError, match=r"--clip-eps-high .*none"):
        train_grpo.main(train_grpo.Args(out_dir=str(tmp_path / "o"), device="cpu",
                                        clip_eps_high=0.0))
