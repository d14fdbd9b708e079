"""The ``m2fp`` command: export, parse, serve, openapi."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_export(args: argparse.Namespace) -> int:
    from m2fp_export.cli import run

    return run(args)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="convert M2FP (ModelScope) to ONNX",
                       description="Export M2FP to one ONNX file with an embedded model card. "
                                   "Source precedence: --checkpoint, --model-id (hub), --random-init.")
    try:
        from m2fp_export.cli import add_arguments
    except ImportError as exc:  # torch/modelscope live in the [export] extra only
        missing = exc.name or str(exc)

        def _unavailable(_: argparse.Namespace) -> int:
            print(f"error: `m2fp export` needs the export extra ({missing} is not installed): "
                  "pip install 'm2fp-service[export]'", file=sys.stderr)
            return 2

        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_unavailable)
        return
    add_arguments(p)
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2fp", description="Multi-person human parsing (M2FP) on ONNX Runtime")
    from m2fp_service import __version__

    parser.add_argument("--version", action="version", version=f"m2fp-service {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
