"""``m2fp export``: argument handling for the exporter (the parser lives in m2fp_service.cli)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

from m2fp_service.modelcard import INPUT_PROFILES

from . import configs
from .quantize import PRESETS

EXIT_HUB_UNAVAILABLE = 3  # distinct, so `make run` falls back to the demo model only for this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, metavar="DIR",
                     help="local copy of the ModelScope model repository (configuration.json + pytorch_model.pt)")
    src.add_argument("--model-id", default=None, metavar="ID",
                     help=f"ModelScope hub model id (default: {configs.MODEL_ID})")
    src.add_argument("--random-init", action="store_true",
                     help="the same architecture with untrained weights (tests, offline demos)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="PATH.onnx")
    parser.add_argument("--config", default="cihp-r101", choices=sorted(configs.BUILTIN),
                        help="built-in configuration for --random-init (default: cihp-r101)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    parser.add_argument("--confident", action="store_true",
                        help="with --random-init: make untrained outputs non-trivial (test fixtures, demos)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="ModelScope download cache")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full pickle loading of pytorch_model.pt (runs code from the file!)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                        help="label-map agreement the check requires on every check image (default 0.999 "
                             "against PyTorch; with --int8, 0.99 for INT8 against FP32)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="also require raw outputs within this relative difference (off by default: raw "
                             "differences are printed, the label maps and people are what is judged)")
    q = parser.add_argument_group("INT8 (static quantization)")
    q.add_argument("--int8", action="store_true",
                   help="write a static INT8 (QDQ) model, calibrated on --calibration or the built-in set, "
                        "and checked against the FP32 graph")
    q.add_argument("--calibration", type=Path, default=None, metavar="DIR",
                   help="folder of photos like the ones you will serve (default: a built-in set)")
    q.add_argument("--quant-preset", default="auto", choices=["auto", *sorted(PRESETS)],
                   help="quantization preset (default: auto, from this CPU's instruction set)")
    q.add_argument("--from-onnx", type=Path, default=None, metavar="PATH.onnx",
                   help="with --int8: quantize this FP32 model written by `m2fp export` instead of exporting "
                        "again (no torch run; the INT8 check is against this FP32 graph)")
    parser.add_argument("--profile", default="default", choices=sorted(INPUT_PROFILES),
                        help="the model card's input profile: 'default' (the reference's size, short edge 640) "
                             "or 'fast' (short edge 384, for live use; its agreement with 'default' is measured)")


def run(args: argparse.Namespace) -> int:
    from . import check
    from .convert import ExportOptions, export_model
    from .errors import ExportError, HubUnavailable
    from .source import from_checkpoint, from_hub, random_init

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # ModelScope, timm and torch warn about their own deprecations on import and trace; not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid")
    if args.confident and not args.random_init:
        print("error: --confident only applies to --random-init", file=sys.stderr)
        return 2
    if (args.calibration is not None or args.from_onnx is not None) and not args.int8:
        print("error: --calibration and --from-onnx only apply to --int8", file=sys.stderr)
        return 2
    if args.from_onnx is not None and (args.random_init or args.checkpoint or args.model_id):
        print("error: --from-onnx is a source of its own; drop --checkpoint/--model-id/--random-init", file=sys.stderr)
        return 2
    try:
        quant = None
        calibration = []
        if args.int8:
            from .images import calibration_from_dir
            from .quantize import QuantizationConfig

            quant = QuantizationConfig.preset(args.quant_preset)
            if args.calibration is not None:
                try:
                    calibration = calibration_from_dir(args.calibration, limit=quant.calibration_count,
                                                       short_edge=quant.calibration_short_edge)
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
        if args.from_onnx is not None:
            from .quantize import quantize_file

            assert quant is not None
            card = quantize_file(args.from_onnx, args.output, quant, calibration,
                                 min_agreement=args.min_agreement)
            print(f"Wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), INT8, trained={card.trained}. "
                  f"Licence: {card.license}.")
            return 0
        if args.random_init:
            print(f"Building the untrained '{args.config}' architecture (--random-init). "
                  "It detects nothing real; use --checkpoint or the hub for the trained model.")
            loaded = random_init(args.config, seed=args.seed, confident=args.confident)
        elif args.checkpoint is not None:
            loaded = from_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        else:
            model_id = args.model_id or configs.MODEL_ID
            print(f"Downloading {model_id} from the ModelScope hub...")
            loaded = from_hub(model_id, cache_dir=args.cache_dir, trust=args.trust_checkpoint)
        params = sum(p.numel() for p in loaded.model.parameters())
        print(f"M2FP network: {params / 1e6:.2f} M parameters, trained={loaded.trained}")
        acceptance = check.Acceptance(
            min_label_agreement=args.min_agreement if args.min_agreement is not None and not args.int8 else 0.999,
            raw_rtol=args.rtol)
        opts = ExportOptions(opset=args.opset, acceptance=acceptance, quantization=quant,
                             calibration_images=calibration, profile=args.profile)
        if quant is not None and args.min_agreement is not None:
            opts.quantization = dataclasses.replace(quant, min_label_agreement=args.min_agreement)
        card = export_model(loaded, args.output, opts)
    except HubUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_HUB_UNAVAILABLE
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    precision = card.exporter.get("precision", "fp32").upper()
    print(f"Wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), {precision}, trained={card.trained}, "
          f"{len(card.parsing_classes)} parsing classes. Licence: {card.license}.")
    return 0
