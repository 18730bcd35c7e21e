"""README's code blocks are tested examples: every `tvtool` line names real commands and options, the Python
snippet runs for real (tiny settings, in a temp dir)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from tvtool.cli import app, main

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(), re.S)


def _tvtool_lines():
    for lang, body in BLOCKS:
        if lang == "bash":
            for line in body.splitlines():
                if line.startswith("tvtool"):
                    yield shlex.split(line, comments=True)


def test_readme_starts_with_install_test_quickstart():
    lang, body = BLOCKS[0]
    commands = [line.split("#")[0].strip() for line in body.splitlines()]
    assert lang == "bash" and commands[:3] == ["pip install -e '.[dev]'", "python -m pytest -q -n 2", "tvtool quickstart"]
    text = README.read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in text


def test_every_tvtool_line_names_real_commands_and_options(capsys):
    lines = list(_tvtool_lines())
    assert len(lines) >= 10
    for argv in lines:
        command, path = typer.main.get_command(app), []
        for word in argv[1:]:
            sub = getattr(command, "commands", {}).get(word)
            if sub is None:
                break
            command, path = sub, [*path, word]
        assert main([*path, "--help"]) == 0, argv
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        used = {w.split("=")[0] for w in argv[1 + len(path):] if w.startswith("-")}
        assert used <= known, (argv, used - known)
    capsys.readouterr()


def test_python_snippet_runs(tmp_path):
    snippets = [body for lang, body in BLOCKS if lang == "python"]
    assert snippets
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**__import__("os").environ,
                                "PYTHONPATH": str(README.parent), "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        abs_acc = float(r.stdout.strip().splitlines()[-1])
        assert 0 <= abs_acc <= 1


QUICKSTART_JSON = README.parent / "docs" / "quickstart.json"


def test_quickstart_tables_are_what_the_command_printed():
    """README's and docs/MINI_WORLD.md's quickstart tables are rendered from docs/quickstart.json, the committed
    output of `tvtool quickstart --json` (regenerate both with that command, never by hand)."""
    import json

    from tvtool.quickstart import markdown_rows

    summary = json.loads(QUICKSTART_JSON.read_text())
    readme = README.read_text()
    mini_world = (README.parent / "docs" / "MINI_WORLD.md").read_text()
    for row in markdown_rows(summary):
        assert row in readme, row
    for row in markdown_rows(summary, detailed=True):
        assert row in mini_world, row


def test_mini_world_merging_table_is_the_recipes_summary():
    """docs/MINI_WORLD.md's merging table is rendered from docs/mini_merging.json, the `summary.json` of
    `tvtool run recipes/mini-merging.yaml` (regenerate both with that command, never by hand), and names every
    merge step of the recipe."""
    import json

    import yaml

    from tvtool.results import tables

    summary = json.loads((README.parent / "docs" / "mini_merging.json").read_text())
    mini_world = (README.parent / "docs" / "MINI_WORLD.md").read_text()
    (merges,) = [t for t in tables(summary) if t["title"].startswith("merge methods")]
    for row in merges["rows"]:
        assert "| " + " | ".join(row[1:]) + " |" in mini_world, row
    recipe = yaml.safe_load((README.parent / "recipes" / "mini-merging.yaml").read_text())
    steps = {s.get("name") or f"merge-{s['method']}" for s in recipe["eval"]["merge"]}
    assert steps == set(summary["variants"]["ft"]["merges"])
