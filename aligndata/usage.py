"""`--help` and `--version` of both command lines: `FILES...` for a required list of arguments.

typer 0.29 writes a required argument as `{files}...` in the usage line and lists it with its Python
type (`FILES <list[str]>`); this command class writes the click forms instead. A command may also list
options that it parses itself (aligntrain's `--overrides k=v k=v`, a variadic flag click has no type
for) in `extra_options`, so that they appear in its Options section.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand


def add_version_option(app: typer.Typer, name: str, version: str, console: Any) -> None:
    """`NAME --version` prints `NAME VERSION` and exits 0, before any command is parsed."""
    def show(value: bool) -> None:
        if value:
            console.print(f"{name} {version}", markup=False)
            raise typer.Exit(0)

    @app.callback()
    def _main(version: bool = typer.Option(False, "--version", callback=show, is_eager=True,
                                           help="Show the version.")) -> None:
        pass


class Command(TyperCommand):
    extra_options: list[tuple[str, str]] = []  # (flag and metavar, help) rows for options parsed by the command

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(argument_name(param))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        params = self.get_params(ctx)
        arguments = [(argument_name(p), p.help or "") for p in params
                     if p.param_type_name == "argument" and not getattr(p, "hidden", False)]
        options = [row for p in params if p.param_type_name == "option" for row in [p.get_help_record(ctx)] if row]
        options[-1:-1] = self.extra_options  # before --help, which click lists last
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)


def argument_name(param: Any) -> str:
    """FILES, [FILE] when optional, FILES... when it takes many: the metavar, else the upper-case name."""
    name = param.metavar or param.name.upper()
    if not param.required:
        name = f"[{name}]"
    return name + "..." if param.nargs != 1 else name


def command_class(*extra_options: tuple[str, str]) -> type[Command]:
    """A Command that lists `extra_options` (rows of (flag, help)) among its options."""
    return type("Command", (Command,), {"extra_options": list(extra_options)})
