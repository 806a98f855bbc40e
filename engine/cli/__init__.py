"""The ``refseg`` command line: ``segment``, ``eval``, ``info``, ``presets`` and the commands of the modules in
:data:`COMMAND_MODULES` that are installed (``export``, ``bench``, ...).

Exit codes: 0 success, 1 some inputs failed (the others were written) or, for ``eval``, no ground truth
could be scored against a prediction, 2 bad arguments, an unusable output, a missing optional package,
missing checkpoints or a reference that cannot be used (nothing was run).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("refseg")

COMMAND_MODULES = ("refseg.cli.segment", "refseg.cli.evaluate", "refseg.cli.outlines", "refseg.export.cli",
                   "refseg.cli.bench")
"""Modules whose ``add_parser(subparsers)`` registers a sub-command; a module that cannot be imported
because it is not installed is left out. Add a command by adding its module here."""


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is available: torch, CUDA, triton, ONNX Runtime, TensorRT, caches")
    p.set_defaults(func=_cmd_info)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the configuration presets with their stages and default models")
    p.set_defaults(func=_cmd_presets)


def _cmd_presets(args: argparse.Namespace) -> int:
    from refseg.config import PRESETS
    from refseg.pipeline.methods import describe_presets

    for row in describe_presets(PRESETS):
        sys.stdout.write(f"{row['preset']:<9} method={row['method']:<8} dinov2={row['dinov2']}  sam={row['sam']}\n"
                         f"          {row['stages']}\n")
    from refseg.config import SAM2_MODELS, SAM_MODELS

    sys.stdout.write(f"--sam (any preset): SAM {', '.join(SAM_MODELS)}; SAM 2 {', '.join(SAM2_MODELS)}\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from refseg.runtime.environment import describe

    sys.stdout.write(describe() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``refseg`` parser with every installed sub-command."""
    parser = argparse.ArgumentParser(prog="refseg", description="One-shot reference-guided segmentation "
                                     "(DINOv2 matching + SAM prompting), training-free.")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="debug messages too (default: info)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ImportError as exc:
            if exc.name != module:
                raise
    _add_info(sub)
    _add_presets(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from refseg.optional import MissingDependencyError

    parser = build_parser()
    args = parser.parse_args(argv)
    # info by default (progress lines), -q warnings only, -v/-vv debug
    level = logging.WARNING if args.quiet else logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(max(level, logging.WARNING))  # no PNG chunk / plugin debug lines
    start = time.perf_counter()
    try:
        code = args.func(args)
    except (ValueError, OSError, MissingDependencyError) as exc:  # bad input, checkpoints, a missing extra
        log.error("%s", exc)
        return 2
    log.debug("done in %.2f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
