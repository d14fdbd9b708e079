"""The ``m2fp`` command: export, export-light, parse, serve, openapi."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m2fp_service.batch import Job
    from m2fp_service.outputs import RenderRequest
    from m2fp_service.shard import Shard


def _lacks_export_extra(p: argparse.ArgumentParser, command: str, modules: tuple[str, ...]) -> bool:
    """True (and ``p`` set to explain it) when the [export] extra is missing: exporters are not part
    of the server's runtime (torch, ModelScope, the converters live in that extra only)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return False

    def _unavailable(_: argparse.Namespace) -> int:
        print(f"error: `m2fp {command}` needs the export extra ({', '.join(missing)} not installed): "
              "pip install 'm2fp-service[export]'", file=sys.stderr)
        return 2

    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_unavailable)
    return True


def _cmd_export(args: argparse.Namespace) -> int:
    from m2fp_export.cli import run

    return int(run(args))


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="convert M2FP (ModelScope) to ONNX",
                       description="Export M2FP to one ONNX file with an embedded model card. "
                                   "Source precedence: --checkpoint, --model-id (hub), --random-init.")
    if _lacks_export_extra(p, "export", ("torch", "modelscope", "onnx")):
        return
    from m2fp_export.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export_light(args: argparse.Namespace) -> int:
    from m2fp_export.light.cli import run

    return int(run(args))


def _add_export_light(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export-light", help="convert MediaPipe's selfie segmenter (the light model) to ONNX",
                       description="Get MediaPipe's selfie segmentation model (Apache-2.0) from the mediapipe "
                                   "wheel on PyPI (or --wheel / --tflite offline), convert it to ONNX, check it "
                                   "against MediaPipe's runtime and write it with an embedded model card.")
    if _lacks_export_extra(p, "export-light", ("m2fp_export", "onnx", "tflite")):
        return
    from m2fp_export.light.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_export_light)


def _cmd_parse(args: argparse.Namespace) -> int:
    from m2fp_service import batch, labelsets, pipeline
    from m2fp_service.config import Settings
    from m2fp_service.engine import ParsingEngine, engine_options
    from m2fp_service.errors import ModelLoadError, ServiceError
    from m2fp_service.modelcard import UNTRAINED_WARNING

    overrides = {"model": args.model} if args.model else {}
    settings = Settings(**overrides)
    kinds = [k.strip() for k in args.outputs.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(batch.OUTPUT_KINDS))
    if unknown or (not kinds and args.background is None):
        print(f"error: --outputs takes a comma-separated subset of {','.join(batch.OUTPUT_KINDS)}; "
              f"got {args.outputs!r}", file=sys.stderr)
        return 2
    try:
        params, backdrop = compose_params(args)
        compose = params.to_request(backdrop is not None).compose if params is not None else None
        background_rgb = pipeline.decode_background(backdrop, settings.image_limits()) if backdrop else None
    except (ServiceError, OSError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    for p in missing:
        print(f"error: {p} does not exist", file=sys.stderr)
    jobs = batch.collect_jobs([p for p in args.paths if p.exists()], args.output_dir)
    if not jobs:
        print("error: no images to parse", file=sys.stderr)
        return 1
    # Which files a job writes does not depend on the model (only its colours do).
    jobs, note = _shard_and_resume(jobs, args, batch.render_request(kinds, labelsets.label_set(args.labels), compose))
    if not jobs:
        print(f"nothing to parse{note}", file=sys.stderr)
        return 1 if missing else 0
    try:
        engine = ParsingEngine(settings.model, options=engine_options(settings))
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if not engine.card.trained:
        print(f"WARNING: {settings.model}: {UNTRAINED_WARNING}", file=sys.stderr)
    request = batch.render_request(kinds, labelsets.label_set(args.labels, engine.card.palette), compose)
    failed = batch.run(engine, jobs, request, limits=settings.image_limits(),
                       mode=args.mode or settings.mask_resolution, background=background_rgb,
                       progress=not args.quiet)
    failed += len(missing)
    done = len(jobs) - (failed - len(missing))
    print(f"parsed {done} of {len(jobs) + len(missing)} inputs into {args.output_dir}"
          + (f"; {failed} failed" if failed else "") + note, file=sys.stderr)
    return 1 if failed else 0


def add_compose_options(p: argparse.ArgumentParser) -> None:
    """The compositing options shared by ``m2fp parse`` and ``m2fp video`` (as /api/background's)."""
    from m2fp_service.labelsets import LABEL_SET_NAMES

    g = p.add_argument_group("virtual background (as POST /api/background)")
    g.add_argument("--background", default=None, metavar="MODE|#RRGGBB|IMAGE",
                   help="transparent, blur, pixelate, a colour (#00ff00) or a backdrop image file (parse: compose a "
                        "picture too; video: default blur)")
    g.add_argument("--keep", default="people",
                   help="people (default), largest, central, people:0,2 or classes:face,hair")
    g.add_argument("--invert", action="store_true", help="apply the effect to the kept region instead of the rest")
    g.add_argument("--blur", type=float, default=20.0, help="blur sigma in pixels (default 20)")
    g.add_argument("--block", type=int, default=16, help="pixelate block size in pixels (default 16)")
    g.add_argument("--feather", type=float, default=0.0, help="soften the border over N pixels (default 0)")
    g.add_argument("--no-refine", dest="refine", action="store_false",
                   help="do not refine the border against the photo")
    g.add_argument("--format", choices=["png", "webp", "jpeg"], default="png", help="composite format (default png)")
    g.add_argument("--quality", type=int, default=90, help="WebP/JPEG quality 1..100 (default 90)")
    p.add_argument("--labels", choices=LABEL_SET_NAMES, default="cihp",
                   help="label set of the outputs and of --keep classes:... (default cihp)")


def compose_params(args: argparse.Namespace) -> tuple[Any, bytes | None]:
    """``(BackgroundParams, backdrop file bytes)`` from the compose options; ``(None, None)`` without
    ``--background``. Raises ``InvalidParameter`` (bad options) or ``OSError`` (unreadable backdrop)."""
    from m2fp_service.errors import InvalidParameter
    from m2fp_service.imaging.compose import MODES
    from m2fp_service.schemas import BackgroundParams, params_from

    if args.background is None:
        return None, None
    values: dict[str, object] = {
        "keep": args.keep, "invert": args.invert, "blur": args.blur, "block": args.block, "feather": args.feather,
        "refine": args.refine, "format": args.format, "quality": args.quality, "labels": args.labels,
    }
    choice, backdrop = args.background, None
    if choice.lower() in MODES and choice.lower() not in ("color", "image"):
        values["mode"] = choice.lower()
    elif choice.startswith("#"):
        values.update(mode="color", color=choice)
    elif Path(choice).is_file():
        backdrop = Path(choice).read_bytes()
        values["mode"] = "image"
    else:
        raise InvalidParameter(f"--background {choice!r} is neither transparent, blur, pixelate, a #rrggbb colour "
                               "nor an image file that exists")
    return params_from(BackgroundParams, values), backdrop
def _shard_and_resume(jobs: list[Job], args: argparse.Namespace, request: RenderRequest) -> tuple[list[Job], str]:
    """``--shard``: this shard's share of the jobs; ``--resume``: without those already done."""
    from m2fp_service import batch, shard

    note = ""
    if args.shard is not None:
        total = len(jobs)
        jobs = shard.select(jobs, args.shard, key=lambda j: j.out_stem.relative_to(args.output_dir).as_posix())
        note += f" (shard {args.shard}: {len(jobs)} of {total} inputs)"
    if args.resume:
        jobs, done = shard.split_done(jobs, lambda j: batch.output_paths(j, request).values())
        note += f" ({len(done)} already done, skipped)"
    return jobs, note


def _shard_arg(text: str) -> Shard:
    from m2fp_service.shard import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_parse(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("parse", help="parse image files and folders",
                       description="Parse images (files, or folders searched recursively) and write "
                                   "<stem>.color.png, <stem>.label.png, <stem>.overlay.png and <stem>.json "
                                   "(and with --background, <stem>.composite.png).")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: $M2FP_MODEL or models/m2fp.onnx)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("out"), help="output folder (default: out)")
    p.add_argument("--outputs", default="color,overlay,label,json",
                   help="comma-separated subset of color,label,overlay,cutout,people,areas,json (json = people "
                        "and areas in <stem>.json; default: color,overlay,label,json); --background adds "
                        "<stem>.composite.<format>")
    p.add_argument("--mode", choices=["exact", "fast"], default=None,
                   help="post-processing resolution (default: $M2FP_MASK_RESOLUTION or exact)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="I/N",
                   help="parse only shard I (0-based) of N: a fixed, disjoint share of the inputs; "
                        "N runs with I = 0..N-1 cover every input (Kubernetes Indexed Job)")
    p.add_argument("--resume", action="store_true",
                   help="skip inputs whose selected outputs all exist already (outputs are written atomically)")
    add_compose_options(p)
    p.set_defaults(func=_cmd_parse)


def _cmd_video(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from m2fp_service import labelsets, pipeline
    from m2fp_service.config import Settings
    from m2fp_service.engine import ParsingEngine, engine_options
    from m2fp_service.errors import ModelLoadError, ServiceError
    from m2fp_service.modelcard import UNTRAINED_WARNING
    from m2fp_service.segmenter import FrameSegmenter
    from m2fp_service.video.heap import keep_freed_memory
    from m2fp_service.video.io import VideoError
    from m2fp_service.video.processor import VideoOptions
    from m2fp_service.video.run import process_video

    keep_freed_memory()  # this process is one frame loop; set before any thread starts
    overrides = {k: v for k, v in (("model", args.model), ("light_model", args.light_model),
                                   ("light_model_landscape", args.light_model_landscape)) if v is not None}
    settings = Settings(**overrides)
    if args.background is None:
        args.background = "blur"
    try:
        params, backdrop = compose_params(args)
        spec = params.to_request(backdrop is not None).compose
        background_rgb = pipeline.decode_background(backdrop, settings.image_limits()) if backdrop else None
    except (ServiceError, OSError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    assert spec is not None
    options = VideoOptions(spec=spec, labels=labelsets.label_set(args.labels),
                           keyframe_interval_s=args.keyframe_interval, smoothing=not args.no_smoothing)
    try:
        segmenter = FrameSegmenter(settings.light_model, settings.light_model_landscape)
        parse = None
        if options.needs_parts:
            # Key frames use the fast input profile unless M2FP_INPUT_PROFILE says otherwise: fresher parts.
            key_options = replace(engine_options(settings), intra_op_threads=args.m2fp_threads,
                                  input_profile=settings.input_profile or "fast")
            engine = ParsingEngine(settings.model, options=key_options)
            if not engine.card.trained:
                print(f"WARNING: {settings.model}: {UNTRAINED_WARNING}", file=sys.stderr)

            def parse(frame: Any) -> Any:
                return pipeline.parse_array(engine, frame, mode="fast")
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    try:
        report = process_video(args.input, args.output, segmenter, options, parse=parse,
                               background_rgb=background_rgb, crf=args.crf, preset=args.preset,
                               progress=not args.quiet)
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except VideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    age = "" if report.max_parts_age is None else (
        f"; {report.key_frames} M2FP key frames, parts at most {report.max_parts_age} frames old")
    print(f"wrote {args.output}: {report.frames} frames {report.width}x{report.height} at {report.fps_in:g} fps in "
          f"{report.seconds:.1f} s ({report.fps:.1f} frames/s); {report.audio_packets} audio packets{age}",
          file=sys.stderr)
    return 0


def _add_video(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("video", help="virtual background for a video file",
                       description="Replace or blur the background of every frame of a video: the light "
                                   "segmenter on every frame, M2FP on key frames when --keep needs parts or "
                                   "people. Output at the input's size and frame rate, audio kept. Outputs: "
                                   ".mp4/.mkv/.mov (H.264), .webm (VP9, alpha with --background transparent), "
                                   ".mov with transparent (ProRes 4444), or a folder of PNG frames.")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    p.add_argument("--model", type=Path, default=None, help="M2FP model (default: $M2FP_MODEL or models/m2fp.onnx); "
                                                            "used only when --keep needs parts or people")
    p.add_argument("--light-model", type=Path, default=None,
                   help="light segmenter (default: $M2FP_LIGHT_MODEL or models/light.onnx)")
    p.add_argument("--light-model-landscape", type=Path, default=None,
                   help="its landscape variant, used for wide frames when present (default: "
                        "$M2FP_LIGHT_MODEL_LANDSCAPE or models/light-landscape.onnx)")
    p.add_argument("--keyframe-interval", type=float, default=2.0, help="seconds between M2FP key frames (default 2)")
    p.add_argument("--m2fp-threads", type=int, default=1, help="threads of M2FP on key frames (default 1: the other "
                                                               "core composes frames)")
    p.add_argument("--no-smoothing", action="store_true", help="no temporal smoothing of the person mask")
    p.add_argument("--crf", type=int, default=20, help="quality of H.264/VP9 (lower is better, default 20)")
    p.add_argument("--preset", default="veryfast", help="x264 preset (default veryfast)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_compose_options(p)
    p.set_defaults(func=_cmd_video)


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
    _add_export_light(sub)
    _add_parse(sub)
    _add_video(sub)
    _add_serve(sub)
    _add_openapi(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
