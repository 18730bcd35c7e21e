"""Every command's --help: an example, a description for every option and argument, flags shown as flags (issue 10)."""
import pytest
import typer

from tvtool.cli import app, main


def _commands(group=None, path=()):
    group = group or typer.main.get_command(app)
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        if not getattr(cmd, "hidden", False):
            yield from _commands(cmd, (*path, name))


ALL = list(_commands())


def test_the_walk_sees_every_family():
    names = {" ".join(p) for p, _ in ALL}
    assert {"", "add", "merge", "models", "finetune", "quickstart", "data list", "eval negation"} <= names


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) or "tvtool" for p, _ in ALL])
def test_help_has_example_descriptions_and_real_flags(path, command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main([*path, "--help"]) == 0
    shown = capsys.readouterr().out
    assert "Example" in shown, f"no example in `tvtool {' '.join(path)} --help`"
    assert "<bool>" not in shown  # a flag takes no value
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        assert (getattr(param, "help", None) or "").strip(), f"tvtool {' '.join(path)}: {param.name} has no help"
        if getattr(param, "is_flag", False):
            assert param.opts[0] in shown


def _examples(text: str):
    """The `tvtool ...` command lines written in a help text (up to a comment, a backtick or a ';')."""
    import re

    for m in re.finditer(r"tvtool ([^`;\n]*)", text or ""):
        line = re.split(r"\s{2,}|\s\(", m.group(1))[0]
        yield ["tvtool", *line.split()]


def test_every_help_example_names_real_commands_and_options():
    seen = 0
    for path, command in ALL:
        for argv in _examples(command.help):
            target, words = typer.main.get_command(app), argv[1:]
            while words and getattr(target, "commands", {}).get(words[0]) is not None:
                target, words = target.commands[words[0]], words[1:]
            known = {o for p in target.params for o in (*p.opts, *p.secondary_opts)}
            used = {w.split("=")[0] for w in words if w.startswith("-") and w != "-" and not w[1:2].isdigit()}
            assert used <= known, (" ".join(path), argv, used - known)
            seen += 1
    assert seen >= 20


@pytest.mark.parametrize("path, card", [
    (("finetune",), "tvtool finetune cars --lambda 1e-4"),
    (("add",), "tvtool add a.st b.st --alpha 0.3"),
    (("negate",), "tvtool negate a.st -o not_a.st"),
    (("inspect",), "tvtool inspect --cosine"),
    ((), "tvtool add a.st b.st --alpha 0.3"),
])
def test_help_examples_use_the_design_cards_lines(path, card):
    command = dict(ALL)[path]
    assert card in [" ".join(argv) for argv in _examples(command.help)], command.help
