"""``m2fp export-light``: argument handling (the parser lives in m2fp_service.cli)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fetch import MEDIAPIPE_VERSION, VARIANTS

EXIT_REGISTRY_UNAVAILABLE = 3  # as `m2fp export` for an unreachable hub


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="PATH.onnx",
                        help="where to write the model (default: models/light.onnx, "
                             "models/light-landscape.onnx for --variant landscape)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="general",
                        help="general (256x256 input) or landscape (144x256, for 16:9 video); default general")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--wheel", type=Path, metavar="PATH.whl",
                     help=f"an already downloaded mediapipe-{MEDIAPIPE_VERSION}-*.whl (offline)")
    src.add_argument("--tflite", type=Path, metavar="FILE",
                     help="the selfie_segmentation*.tflite file itself (offline)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="where the downloaded wheel and extracted .tflite are kept (default: ~/.cache/m2fp)")
    parser.add_argument("--allow-unknown-tflite", action="store_true",
                        help="convert a --tflite whose SHA-256 is not the recorded model's")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="parity tolerance: max |ours - MediaPipe| person probability (default 1e-3)")
    parser.add_argument("--require-reference", action="store_true",
                        help="fail when mediapipe (the parity reference) is not installed, instead of warning")


def default_output(variant: str) -> Path:
    return Path("models/light.onnx" if variant == "general" else f"models/light-{variant}.onnx")


def run(args: argparse.Namespace) -> int:
    from ..errors import ExportError, HubUnavailable
    from .export import LightExportOptions, export_light
    from .fetch import obtain

    if args.atol <= 0:
        print("error: --atol must be positive", file=sys.stderr)
        return 2
    if args.allow_unknown_tflite and args.tflite is None:
        print("error: --allow-unknown-tflite only applies to --tflite", file=sys.stderr)
        return 2
    output = args.output or default_output(args.variant)
    try:
        if args.tflite is None and args.wheel is None:
            print(f"Getting mediapipe=={MEDIAPIPE_VERSION} (wheel, no install) for the {args.variant} model...")
        source = obtain(args.variant, wheel=args.wheel, tflite=args.tflite, cache_dir=args.cache_dir,
                        allow_unknown=args.allow_unknown_tflite)
        card = export_light(source, output, LightExportOptions(atol=args.atol,
                                                               require_reference=args.require_reference))
    except HubUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REGISTRY_UNAVAILABLE
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    checked = card.parity.get("checked")
    parity = (f"parity vs MediaPipe: max diff {card.parity['max_abs_diff']:.1e}" if checked
              else "parity NOT checked (mediapipe not installed)")
    print(f"Wrote {output} ({output.stat().st_size / 1e3:.0f} kB): {card.variant}, input "
          f"{card.input_hw[0]}x{card.input_hw[1]}, {parity}. Licence: {card.license}.")
    return 0
