"""Where the network comes from: a local model repository, the ModelScope hub, or random init.

All three build the network with ModelScope's own ``M2FP`` class, so module and parameter
names are exactly those of the published checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import configs, msda
from .errors import HubUnavailable, NotAnM2FPModel, UntrustedCheckpoint

log = logging.getLogger("m2fp_export")

CONFIG_FILE = "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"
_REQUIRED_MODEL_KEYS = ("backbone", "encoder", "decoder", "classes", "num_parsing")


@dataclass
class LoadedModel:
    """A ready-to-export network and what the model card says about where it came from."""

    model: torch.nn.Module
    model_cfg: dict[str, Any]
    trained: bool
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def build_m2fp(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """Builds ModelScope's M2FP from a ``model`` configuration section, without weights."""
    msda.install()
    from modelscope.models.cv.image_human_parsing.m2fp_net import M2FP

    kwargs = {k: v for k, v in copy.deepcopy(model_cfg).items() if k not in ("type", "pretrained")}
    model = M2FP("", pretrained=False, **kwargs)
    return model.eval()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """Reads and checks ``configuration.json``; returns its ``model`` section."""
    if not model_dir.is_dir():
        raise NotAnM2FPModel(f"{model_dir} is not a directory; --checkpoint expects a local copy of the "
                             f"ModelScope model repository ({CONFIG_FILE} + {WEIGHTS_FILE})")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise NotAnM2FPModel(f"{model_dir} is not an M2FP model repository: missing {', '.join(missing)} "
                             f"(expected {CONFIG_FILE} and {WEIGHTS_FILE}, as in {configs.MODEL_ID})")
    try:
        cfg = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAnM2FPModel(f"{model_dir / CONFIG_FILE} is not readable JSON: {exc}") from exc
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict):
        raise NotAnM2FPModel(f"{model_dir / CONFIG_FILE} has no 'model' section")
    if str(model_cfg.get("type", "")).lower() != "m2fp":
        raise NotAnM2FPModel(f"{model_dir / CONFIG_FILE} describes model type {model_cfg.get('type')!r}, not 'm2fp'")
    absent = [k for k in _REQUIRED_MODEL_KEYS if k not in model_cfg]
    if absent:
        raise NotAnM2FPModel(f"{model_dir / CONFIG_FILE} 'model' section lacks {', '.join(absent)}")
    classes, num_parsing = model_cfg["classes"], model_cfg["num_parsing"]
    if not isinstance(classes, list) or not isinstance(num_parsing, int) or len(classes) < num_parsing + 1:
        raise NotAnM2FPModel(f"{model_dir / CONFIG_FILE}: 'classes' must list num_parsing + 1 names (parts, then "
                             f"the human class); got {len(classes) if isinstance(classes, list) else classes!r} "
                             f"for num_parsing={num_parsing!r}")
    if model_cfg.get("single_human", True):  # M2FP.__init__ defaults to single-human too
        raise NotAnM2FPModel(f"{model_dir} is a single-human M2FP model; this service serves the multi-person "
                             f"model ({configs.MODEL_ID})")
    return dict(model_cfg)


def load_state_dict(weights: Path, *, trust: bool) -> dict[str, torch.Tensor]:
    """Loads ``pytorch_model.pt`` (a dict with a ``model`` state dict).

    Tensors-only loading (``weights_only=True``) is the default on recent PyTorch and the only
    mode we use unless ``trust`` is set: a full unpickle runs arbitrary code from the file.
    """
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # Only a well-formed pickle that asks for more than tensors is a question of trust; a
        # truncated or corrupt file (an interrupted download) is just broken.
        if not trust and "Unsupported global" in str(exc):
            raise UntrustedCheckpoint(
                f"{weights} holds more than tensors and PyTorch refused to unpickle it safely. If you trust "
                f"where this file came from, re-run with --trust-checkpoint. ({str(exc).splitlines()[-1][:200]})"
            ) from exc
        raise NotAnM2FPModel(f"{weights} is corrupt or truncated, not a readable PyTorch checkpoint: "
                             f"{str(exc).splitlines()[0][:200]}") from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise NotAnM2FPModel(f"{weights} is not a readable PyTorch checkpoint: {exc}") from exc
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NotAnM2FPModel(f"{weights} does not contain a state dict under 'model'")
    return state


def apply_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Loads weights the way ``M2FP.__init__`` does (skip unknown or mis-shaped entries, non-strict),
    but refuses a checkpoint that leaves any parameter of the network unset."""
    target = model.state_dict()
    notes = []
    usable = {}
    for name, tensor in state.items():
        if name not in target:
            notes.append(f"checkpoint entry {name} is not in the network; skipped (as ModelScope does)")
        elif tuple(tensor.shape) != tuple(target[name].shape):
            notes.append(f"checkpoint entry {name} has shape {tuple(tensor.shape)}, network wants "
                         f"{tuple(target[name].shape)}; skipped (as ModelScope does)")
        else:
            usable[name] = tensor
    result = model.load_state_dict(usable, strict=False)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise NotAnM2FPModel(f"checkpoint leaves {len(result.missing_keys)} network entries unset "
                             f"(e.g. {shown}); it does not match configuration.json")
    return notes


def from_checkpoint(model_dir: Path, *, trust: bool = False, kind: str = "checkpoint",
                    model_id: str | None = None) -> LoadedModel:
    """Builds M2FP from a local model repository (``configuration.json`` + ``pytorch_model.pt``)."""
    model_cfg = read_model_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    log.info("building M2FP from %s", model_dir / CONFIG_FILE)
    model = build_m2fp(model_cfg)
    log.info("loading weights %s", weights)
    notes = apply_weights(model, load_state_dict(weights, trust=trust))
    source = {"kind": kind, "path": str(model_dir.resolve()), "weights_sha256": sha256_file(weights),
              "config_sha256": sha256_file(model_dir / CONFIG_FILE)}
    if model_id:
        source["model_id"] = model_id
    return LoadedModel(model.eval(), model_cfg, trained=True, source=source, notes=notes)


def download(model_id: str, cache_dir: Path | None = None, revision: str | None = None) -> Path:
    """Downloads the model repository with ModelScope's own client (shows its progress bars)."""
    try:
        from modelscope import snapshot_download
    except ImportError as exc:  # pragma: no cover - modelscope is in the export extra
        raise HubUnavailable(f"ModelScope is not installed ({exc}); pip install 'm2fp-service[export]'") from exc
    hint = ("Without network access, export from a local copy of the model repository with "
            "--checkpoint DIR (a folder with configuration.json and pytorch_model.pt), or build the "
            "untrained architecture with --random-init.")
    try:
        path = snapshot_download(model_id, cache_dir=str(cache_dir) if cache_dir else None, revision=revision)
    except Exception as exc:  # ModelScope raises many types (network, HTTP, hub errors)
        raise HubUnavailable(f"could not download {model_id} from the ModelScope hub: "
                             f"{type(exc).__name__}: {str(exc)[:300]}. {hint}") from exc
    return Path(path)


def from_hub(model_id: str, *, cache_dir: Path | None = None, trust: bool = False) -> LoadedModel:
    return from_checkpoint(download(model_id, cache_dir), trust=trust, kind="hub", model_id=model_id)


def random_init(config_name: str = "cihp-r101", *, seed: int = 0, confident: bool = False) -> LoadedModel:
    """The built-in architecture with untrained weights (for tests and offline demos)."""
    from .confident import make_confident

    model_cfg = configs.builtin_config(config_name)
    torch.manual_seed(seed)
    model = build_m2fp(model_cfg)
    notes = [f"UNTRAINED: random weights (seed {seed}) of the built-in '{config_name}' configuration; "
             "labels are meaningless"]
    if confident:
        make_confident(model)
        notes.append("decoder residual branches zeroed and heads scaled so untrained outputs are "
                     "non-trivial (test fixture recipe)")
    source = {"kind": "random-init", "config": config_name, "seed": seed, "confident": confident}
    return LoadedModel(model.eval(), model_cfg, trained=False, source=source, notes=notes)
