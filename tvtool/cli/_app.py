"""The typer application that every command family registers on."""
import typer

app = typer.Typer(
    name="tvtool",
    help=(
        "Task-vector toolkit: fine-tune CLIP with OrthoReg, build task vectors, add / negate / merge them, "
        "evaluate task arithmetic and inspect how orthogonal your vectors are.\n\n"
        "Example: tvtool finetune cars --lambda 1e-4;  tvtool add a.st b.st --alpha 0.3;  tvtool inspect --cosine"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _render_flags_as_flags() -> None:
    """typer 0.29's rich help prints a value type after every option, flags included (`--force <bool>`, as if it
    took a value). Flags take no value: show none. Older typer has no `display_type_rich` and renders flags right.
    tests/test_cli_help.py checks every command's help for `<bool>`."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_tvtool_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._tvtool_flags = True
    TyperOption.display_type_rich = display_type_rich


_render_flags_as_flags()
