"""The typer application that every command family registers on."""
import typer

app = typer.Typer(
    name="tvtool",
    help=(
        "Task-vector toolkit: fine-tune CLIP with OrthoReg, build task vectors, add / negate / merge them, "
        "evaluate task arithmetic and inspect how orthogonal your vectors are."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
