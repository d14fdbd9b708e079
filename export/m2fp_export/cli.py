"""``m2fp export``: argument handling for the exporter (the parser lives in m2fp_service.cli)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from . import configs

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
    parser.add_argument("--rtol", type=float, default=1e-4, help="parity tolerance, relative (default 1e-4)")


def run(args: argparse.Namespace) -> int:
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
    try:
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
        card = export_model(loaded, args.output, ExportOptions(opset=args.opset, rtol=args.rtol))
    except HubUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_HUB_UNAVAILABLE
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB), trained={card.trained}, "
          f"{len(card.parsing_classes)} parsing classes. Licence: {card.license}.")
    return 0
