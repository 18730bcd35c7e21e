"""Usage errors through the installed entry point: the usual usage message, exit 2, never a traceback (issue 9).

typer >= 0.29 raises its own copy of click's exceptions; running the real `tvtool` script in a subprocess is what
catches a dependency upgrade that breaks this again.
"""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import REPO, run_tvtool
from tvtool.cli import main


@pytest.mark.parametrize("args, says", [
    (["add"], "Missing argument"),                             # -o has a default name (tests/test_cli_card.py)
    (["negate"], "Missing argument"),
    (["finetune"], "Missing argument"),
    (["--bogus"], "No such option"),
    (["add", "a.st", "-o", "b.st", "--bogus"], "No such option"),
    (["nosuch"], "No such command"),
    (["add", "a.st", "-o", "b.st", "--alpha", "x"], "Invalid value"),
])
def test_usage_errors_exit_2_without_traceback(args, says, tmp_path):
    r = run_tvtool(*args, cwd=tmp_path)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert says in r.stderr and "Usage:" in r.stderr, r.stderr
    assert r.stdout == ""
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, listed", [
    ([], ["extract", "add", "merge", "eval", "data"]),
    (["data"], ["list", "check", "prepare"]),
    (["eval"], ["accuracy", "addition", "negation", "disentanglement"]),
])
def test_bare_command_groups_print_their_help(args, listed):
    """click's convention for no_args_is_help (which typer keeps): the help, then exit status 2."""
    r = run_tvtool(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    shown = r.stdout + r.stderr
    assert "Usage:" in shown and all(name in shown for name in listed), shown


def test_version_and_help_exit_0():
    from tvtool import __version__

    r = run_tvtool("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tvtool {__version__}"
    r = run_tvtool("add", "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout and r.stderr == ""


def test_user_error_is_one_line_exit_1(tmp_path):
    r = run_tvtool("negate", str(tmp_path / "missing.st"), "-o", str(tmp_path / "out.st"))
    assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    assert not (tmp_path / "out.st").exists()


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"visual.w": torch.randn(8, 4, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({k: v + 0.1 for k, v in base.items()}, tmp_path / "ft.safetensors")
    return tmp_path


def test_base_is_a_hidden_alias_of_pretrained(weights):
    t = weights
    common = ["--finetuned", str(t / "ft.safetensors"), "--task", "x"]
    assert main(["extract", "--pretrained", str(t / "base.safetensors"), *common, "-o", str(t / "new.st")]) == 0
    r = run_tvtool("extract", "--base", str(t / "base.safetensors"), *common, "-o", str(t / "old.st"))
    assert r.returncode == 0, r.stderr
    assert (t / "new.st").read_bytes() != b"" and _tensors(t / "new.st") == _tensors(t / "old.st")
    for cmd in (["extract", *common], ["apply", str(t / "new.st")]):
        r = run_tvtool(*cmd, "--pretrained", str(t / "base.safetensors"), "--base", str(t / "ft.safetensors"),
                       "-o", str(t / "both.out"))
        assert r.returncode == 2 and "old name of --pretrained" in r.stderr, r.stderr
    assert main(["apply", str(t / "new.st"), "--base", str(t / "base.safetensors"), "-o",
                 str(t / "m.safetensors")]) == 0
    help_text = run_tvtool("extract", "--help").stdout
    assert "--pretrained" in help_text and "--base" not in help_text  # hidden


def _tensors(path):
    from safetensors.torch import load_file

    return {k: v.tolist() for k, v in load_file(path).items()}


def test_merge_list_json_is_only_json():
    r = run_tvtool("merge", "--list", "--json")
    assert r.returncode == 0, r.stderr
    methods = json.loads(r.stdout)
    from tvtool.merge import REGISTRY

    assert [m["name"] for m in methods] == list(REGISTRY)
    assert all(isinstance(m["options"], dict) and m["doc"] for m in methods)


def test_ctrl_c_exits_130(tmp_path):
    """Ctrl-C mid-run: exit 128 + SIGINT on every typer allowed (0.12 with click 8.1 said "Aborted." and exit 1)."""
    import signal
    import time

    from cli_helpers import entry_point

    out = tmp_path / "v.st"
    proc = subprocess.Popen([entry_point(), "finetune", "mini-shapes", "--epochs", "1000", "--no-eval",
                             "--log-every", "1", "--device", "cpu", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    first = ""
    for _ in range(20):  # up to the first progress line (the data placement line comes before it): training started
        first = proc.stderr.readline()
        if "step" in first or not first:
            break
    assert "step" in first, first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, first + rest
    assert "Traceback" not in rest and not out.exists()
