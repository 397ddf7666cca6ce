"""The ``m3d-edge`` command line: thin typer commands over the Python API.

Each command group lives in :mod:`m3d_edge.cli.commands`; their shared options in
:mod:`m3d_edge.cli.options`. Errors: every :class:`~m3d_edge.errors.M3DEdgeError` becomes one red line
``error: <message>`` and the exit code of its class; tracebacks only with ``m3d-edge --debug ...``
(or ``M3D_EDGE_DEBUG=1``).
"""

from __future__ import annotations

import typer

from m3d_edge import __version__
from m3d_edge.cli.commands import ask, batch, bench, demo, export, inspect, listen, retrieval, serve
from m3d_edge.cli.common import STATE, console
from m3d_edge.cli.options import EXIT_CODES

APP_HELP = f"""M3D-LaMed on the edge: compile the 3D medical multimodal LLM to ONNX and run it without torch.

Start with [bold]m3d-edge demo[/bold] (no weights or data needed), then
[bold]m3d-edge export CKPT -o BUNDLE[/bold] and [bold]m3d-edge run BUNDLE STUDY --task segment --target liver[/bold].

Add --debug before the command for full tracebacks.

{EXIT_CODES}"""

app = typer.Typer(
    name="m3d-edge",
    help=APP_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
for _group in (demo, export, inspect, ask, batch, bench, serve, listen, retrieval):
    app.registered_commands += _group.commands.registered_commands
    app.registered_groups += _group.commands.registered_groups


def _version(value: bool) -> None:
    if value:
        console.print(f"m3d-edge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one error line."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    STATE["debug"] = debug


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
