"""The ``m2fp`` command: export, parse, serve, openapi."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_export(args: argparse.Namespace) -> int:
    from m2fp_export.cli import run

    return int(run(args))


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="convert M2FP (ModelScope) to ONNX",
                       description="Export M2FP to one ONNX file with an embedded model card. "
                                   "Source precedence: --checkpoint, --model-id (hub), --random-init.")
    missing = [m for m in ("torch", "modelscope", "onnx") if importlib.util.find_spec(m) is None]
    if missing:  # torch/modelscope live in the [export] extra only; the server runs without them

        def _unavailable(_: argparse.Namespace) -> int:
            print(f"error: `m2fp export` needs the export extra ({', '.join(missing)} not installed): "
                  "pip install 'm2fp-service[export]'", file=sys.stderr)
            return 2

        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_unavailable)
        return
    from m2fp_export.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_export)


def _cmd_parse(args: argparse.Namespace) -> int:
    from m2fp_service import batch
    from m2fp_service.config import Settings
    from m2fp_service.engine import ParsingEngine, engine_options
    from m2fp_service.errors import ModelLoadError
    from m2fp_service.modelcard import UNTRAINED_WARNING

    overrides = {"model": args.model} if args.model else {}
    settings = Settings(**overrides)
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(batch.OUTPUT_KINDS))
    if unknown or not kinds:
        print(f"error: --outputs takes a comma-separated subset of {','.join(batch.OUTPUT_KINDS)}; "
              f"got {args.outputs!r}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    for p in missing:
        print(f"error: {p} does not exist", file=sys.stderr)
    jobs = batch.collect_jobs([p for p in args.paths if p.exists()], args.output_dir)
    if not jobs:
        print("error: no images to parse", file=sys.stderr)
        return 1
    try:
        engine = ParsingEngine(settings.model, options=engine_options(settings))
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if not engine.card.trained:
        print(f"WARNING: {settings.model}: {UNTRAINED_WARNING}", file=sys.stderr)
    failed = batch.run(engine, jobs, kinds, max_pixels=settings.max_pixels, max_side=settings.max_side,
                       mode=args.mode or settings.mask_resolution, progress=not args.quiet)
    failed += len(missing)
    done = len(jobs) - (failed - len(missing))
    print(f"parsed {done} of {len(jobs) + len(missing)} inputs into {args.output_dir}"
          + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _add_parse(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("parse", help="parse image files and folders",
                       description="Parse images (files, or folders searched recursively) and write "
                                   "<stem>.color.png, <stem>.label.png, <stem>.overlay.png and <stem>.json.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: $M2FP_MODEL or models/m2fp.onnx)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("out"), help="output folder (default: out)")
    p.add_argument("--outputs", default="color,overlay,label,json",
                   help="comma-separated subset of color,overlay,label,json (default: all)")
    p.add_argument("--mode", choices=["exact", "fast"], default=None,
                   help="post-processing resolution (default: $M2FP_MASK_RESOLUTION or exact)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_parse)


def _cmd_serve(args: argparse.Namespace) -> int:
    from m2fp_service.api.serve import serve
    from m2fp_service.config import Settings

    overrides = {k: v for k, v in (("model", args.model), ("host", args.host), ("port", args.port)) if v is not None}
    return serve(Settings(**overrides))


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (REST API, WebUI, /docs)",
                       description="Serve the REST API, the WebUI at / and the docs at /docs. Settings come "
                                   "from M2FP_* environment variables (README); these options override them. "
                                   "SIGTERM/Ctrl-C: stop accepting, finish in-flight requests, exit 0.")
    p.add_argument("--model", type=Path, default=None, metavar="PATH.onnx",
                   help="ONNX model (default: $M2FP_MODEL or models/m2fp.onnx)")
    p.add_argument("--host", default=None, help="bind address (default: $M2FP_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: $M2FP_PORT or 8000)")
    p.set_defaults(func=_cmd_serve)


def _cmd_openapi(args: argparse.Namespace) -> int:
    from m2fp_service.api.serve import write_openapi

    return write_openapi(args.output, check=args.check)


def _add_openapi(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("openapi", help="write the OpenAPI document (openapi/openapi.json)",
                       description="Write the OpenAPI document the service serves, or --check that it is current.")
    p.add_argument("-o", "--output", type=Path, default=Path("openapi/openapi.json"),
                   help="where to write it (default: openapi/openapi.json)")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs instead of writing it")
    p.set_defaults(func=_cmd_openapi)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2fp", description="Multi-person human parsing (M2FP) on ONNX Runtime")
    from m2fp_service import __version__

    parser.add_argument("--version", action="version", version=f"m2fp-service {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_parse(sub)
    _add_serve(sub)
    _add_openapi(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
