"""Command line: `python -m training.run <command> ...` from the repository root.

With no arguments it runs the embedded default: the whole method on the shapes world (Bridge training,
cross-space distillation, evaluation and a report), on a CPU, in about 6-9 minutes on 2 CPU cores (README.md and
training/shapes/settings.py EXPECTED_TIME give the measurement and say the same), with the CPU threads its first line
names (`--threads N` chooses).

Commands:
  shapes    the default run on the shapes world (also what no arguments does)
  bridge    train a Bridge (SD1.5 latents -> teacher latents) from a folder of images
  distill   distil a one-step SD1.5 student from a teacher through a trained Bridge
  sample    write one-step student images

Each command lives in its own module (training/cli/) with `add_arguments(parser)` and `run(args)`; this file only
dispatches, and imports a command's module (and with it torch and diffusers) only when it runs, so
`--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# `shapes` has its own full parser (training/shapes/run.py); its arguments follow the command name.
SHAPES_HELP = "the default run: Bridge + cross-space distillation + evaluation on the shapes world (no arguments)"
COMMANDS = {
    "bridge": ("cli.bridge", "train a Bridge from a folder of images (or --demo: tiny models, synthetic images)"),
    "distill": ("cli.distill", "distil a one-step SD1.5 student through a trained Bridge"),
    "sample": ("cli.sample", "write one-step images from a student checkpoint"),
}


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(load_commands: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Cross-Space Distillation: Bridge training and one-step student distillation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("shapes", help=SHAPES_HELP, description=SHAPES_HELP + " (see `shapes --help`)", add_help=False)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's arguments are needed; `--help` of the top level lists commands only.
        if load_commands in (name, "*"):
            _module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input or an unusable environment ends in one `error: ...` line on stderr and returns 2
    (see training/errors.py: what is not a user error keeps its traceback)."""
    from .errors import explain, one_line

    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except Exception as e:
        err = explain(e)
        if err is None:
            raise
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    # No command (options only, e.g. --fresh) is the embedded default, the shapes run; --help lists the commands.
    default = not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))
    if default or argv[0] == "shapes":
        from .shapes.settings import parse_args

        prog = "python -m training.run" + ("" if default else " shapes")  # the command the user typed
        args = parse_args(argv if default else argv[1:], prog=prog)  # checked before torch loads
        from .shapes.run import run_args

        return int(run_args(args) or 0)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(load_commands=chosen)
    args = parser.parse_args(argv)
    if args.command is None:  # only options such as --help reach here
        parser.print_help()
        return 2
    return int(_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
