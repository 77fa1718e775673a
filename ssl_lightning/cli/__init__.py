"""``ssl-lightning``: the console entry point.

``fit``/``validate``/``test``/``predict`` go to LightningCLI (``ssl_lightning.cli.lightning_cli``), ``eval``,
``export`` and ``prepare`` to their own commands. Heavy imports happen only once a command is chosen, so ``--help`` answers
at once. A failing command prints one line naming what is wrong and exits non-zero; ``--debug`` or
``SSL_LIGHTNING_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from ssl_lightning.cli.errors import ConfigError, debug_requested, one_line

EXIT_ERROR = 1
EXIT_USAGE = 2


def run_cli(args: Optional[list[str]] = None) -> Any:
    """Run a LightningCLI subcommand (``fit``, ...) and return the CLI object; errors propagate."""
    from ssl_lightning.cli.lightning_cli import run_cli as run

    return run(sys.argv[1:] if args is None else list(args))


def run_command(argv: list[str]) -> Any:
    if argv[:1] == ["eval"]:
        from ssl_lightning.eval.command import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["export"]:
        from ssl_lightning.eval.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["prepare"]:
        from ssl_lightning.cli.prepare import main as prepare_main

        return prepare_main(argv[1:])
    return run_cli(argv)


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point ``ssl-lightning``."""
    debug, argv = debug_requested(sys.argv[1:] if args is None else list(args))
    if not argv or argv[0] in ("-h", "--help", "help"):
        from ssl_lightning.cli.help import usage

        print(usage())
        return
    command = argv[0] if argv[0] in ("fit", "validate", "test", "predict", "eval", "export", "prepare") else None
    if command is None:
        sys.exit(f"ssl-lightning: error: unknown command {argv[0]!r}; use fit, validate, test, predict, eval, export or prepare (ssl-lightning --help)")
    try:
        run_command(argv)
    except SystemExit:
        raise
    except Exception as error:
        if debug:
            raise
        print(f"ssl-lightning {command}: error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(EXIT_USAGE if isinstance(error, ConfigError) or type(error).__name__ == "ArgumentError" else EXIT_ERROR)
