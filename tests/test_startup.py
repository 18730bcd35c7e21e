"""Commands that do no tensor math start without importing torch (issue 10).

Checking `sys.modules` is robust on a noisy machine, unlike a timing; the timing ratio itself is a benchmark.
"""
import os
import statistics
import subprocess
import sys
import time

import pytest

from cli_helpers import REPO, entry_point, run_python

LIGHT_COMMANDS = [
    ["--version"],
    ["--help"],
    ["add", "--help"],
    ["extract", "--help"],
    ["finetune", "--help"],
    ["eval", "addition", "--help"],
    ["data", "prepare", "--help"],
    ["merge", "--help"],
    ["merge", "--list"],
    ["merge", "--list", "--json"],
    ["models"],
    ["models", "ViT-B", "--json"],
    ["data", "list"],
    ["data", "list", "--json"],
]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_never_import_torch(argv):
    code = (
        "import sys\n"
        "from tvtool.cli import main\n"
        f"rc = main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
        "assert rc == 0, rc\n"
        "assert not heavy, heavy\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_heavy_modules_are_imported_by_commands_that_need_them(tmp_path):
    """The check above can fail: a command that builds a model (apply onto an open_clip ARCH:TAG) imports torch."""
    import numpy as np

    from tvtool.taskvector import new_meta, write_vector

    write_vector(tmp_path / "v.st", {"visual.nosuch": np.ones(2, np.float32)}, new_meta({"model": "tvtool-mini"}))
    code = ("import sys\nfrom tvtool.cli import main\n"
            f"assert main(['apply', {str(tmp_path / 'v.st')!r}, '--pretrained', 'tvtool-mini:builtin', "
            f"'-o', {str(tmp_path / 'o.st')!r}]) == 1\n"
            "assert 'torch' in sys.modules\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]


def _median_seconds(cmd, runs=5):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@pytest.mark.benchmark
def test_startup_ratio_to_import_torch():
    """Issue 10's bar: light commands in <= 0.25 x a bare `import torch` (median of 5 runs each)."""
    torch_s = _median_seconds([sys.executable, "-c", "import torch"])
    for argv in (["--version"], ["add", "--help"], ["models"], ["data", "list"]):
        s = _median_seconds([entry_point(), *argv])
        print(f"tvtool {' '.join(argv)}: {s:.3f} s = {s / torch_s:.2f} x import torch ({torch_s:.3f} s)")
        assert s <= 0.25 * torch_s


def test_file_commands_on_safetensors_never_import_torch(tmp_path):
    """extract (with architecture inference), add, negate, apply and inspect of safetensors files run on numpy:
    torch (and open_clip, whose __init__ imports torch and torchvision) would cost seconds of start-up."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {"visual.transformer.resblocks.0.attn.in_proj_weight": rng.standard_normal((48, 16), dtype=np.float32),
            "visual.proj": rng.standard_normal((16, 8), dtype=np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v + 0.1 for k, v in base.items()}, str(tmp_path / "ft.safetensors"))
    p = lambda name: str(tmp_path / name)  # noqa: E731
    code = (
        "import sys\nfrom tvtool.cli import main\n"
        f"assert main(['extract', '--pretrained', {p('base.safetensors')!r}, '--finetuned', {p('ft.safetensors')!r}, "
        f"'--task', 't', '-o', {p('v.st')!r}]) == 0\n"
        f"assert main(['add', {p('v.st')!r}, {p('v.st')!r}, '-o', {p('s.st')!r}]) == 0\n"
        f"assert main(['negate', {p('v.st')!r}, '-o', {p('n.st')!r}]) == 0\n"
        f"assert main(['apply', {p('v.st')!r}, '--pretrained', {p('base.safetensors')!r}, '-o', {p('m.st')!r}]) == 0\n"
        f"assert main(['inspect', {p('s.st')!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.benchmark
def test_finetune_refusals_answer_like_light_commands(tmp_path):
    """Issue 26: `finetune` refuses an existing output or a bad option before importing torch, in <= 0.25 x a bare
    `import torch`, like `add` (median of 5 runs each)."""
    (tmp_path / "a.st").write_bytes(b"x")
    torch_s = _median_seconds([sys.executable, "-c", "import torch"])
    for argv in (["finetune", "mini-shapes", "-o", str(tmp_path / "a.st")],
                 ["finetune", "mini-shapes", "--lr", "nan", "-o", str(tmp_path / "b.st")]):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            r = subprocess.run([entry_point(), *argv], capture_output=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's code
            times.append(time.perf_counter() - t)
            assert r.returncode == 1
        s = statistics.median(times)
        print(f"tvtool {' '.join(argv[:2])} refusal: {s:.3f} s = {s / torch_s:.2f} x import torch ({torch_s:.3f} s)")
        assert s <= 0.25 * torch_s
