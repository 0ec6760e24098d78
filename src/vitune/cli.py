"""The `vitune` command: one subcommand per capability, each registered by the module that owns it.

Each entry below names a module with `register(subparsers)`, which adds its subcommand(s) and sets
`func` on the parser. Modules are imported here but must keep heavy imports (torch, transformers)
inside their command functions, so `vitune --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vitune.errors import USER_FIXABLE_ERRNOS, VituneError, describe_os_error

# Order is the order of `vitune --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "vitune.world.commands",
    "vitune.datagen.commands",
    "vitune.model.commands",
    "vitune.interop.commands",
    "vitune.train.commands",
    "vitune.eval.commands",
    "vitune.serve.commands",
    "vitune.demo",
    "vitune.ablations",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitune",
        description="Visual instruction tuning (LLaVA): data generation, training, evaluation, serving.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except VituneError as err:
        print(f"vitune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, no permission: the user's to fix, said in one line
        if err.errno not in USER_FIXABLE_ERRNOS:
            raise
        print(f"vitune {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
