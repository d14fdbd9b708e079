"""GET /api/info: the model card (classes, palette, input policy, trained or not, licence) and limits."""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict
from importlib import metadata

from fastapi import APIRouter

from m2fp_service import __version__, labelsets
from m2fp_service.api.deps import SettingsDep, SlotDep
from m2fp_service.config import Settings
from m2fp_service.modelcard import UNTRAINED_WARNING
from m2fp_service.schemas import OUTPUT_DOCS, InfoResponse, LabelSetOut, ModelInfo

router = APIRouter(tags=["info"])

LICENSE_NOTE = "The M2FP weights and code are licensed CC BY-NC 4.0: non-commercial use only."


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def versions() -> dict[str, str]:
    return {
        "m2fp_service": __version__,
        "python": platform.python_version(),
        **{pkg: _version(pkg) for pkg in ("onnxruntime", "numpy", "opencv-contrib-python-headless", "fastapi")},
    }


def label_sets(cihp_palette: list[tuple[int, int, int]] | None) -> dict[str, LabelSetOut]:
    """Every label set with its classes and palette (CIHP's from the model card when one is loaded)."""
    out = {}
    for name in labelsets.LABEL_SET_NAMES:
        labels = labelsets.label_set(name, cihp_palette)
        out[name] = LabelSetOut(description=labelsets.TABLES[name].description, classes=list(labels.classes),
                                palette=[list(c) for c in labels.palette])
    return out


def _limits(settings: Settings) -> dict[str, object]:
    return {
        "max_upload_bytes": settings.max_upload_bytes,
        "max_pixels": settings.max_pixels,
        "max_side": settings.max_side,
        "request_timeout_s": settings.request_timeout_s,
        "accepted_formats": ["JPEG", "PNG", "WebP", "BMP"],
    }


@router.get("/api/info", response_model=InfoResponse)
async def info(settings: SettingsDep, slot: SlotDep) -> InfoResponse:
    """Model card and serving settings: classes, palette, input policy, trained or not, licence, limits."""
    engine = slot.engine if slot.status == "ready" else None
    card = engine.card if engine else None
    warnings = [LICENSE_NOTE]
    if card is not None and not card.trained:
        warnings.insert(0, UNTRAINED_WARNING)
    if slot.status != "ready":
        warnings.insert(0, f"model {slot.status}: {slot.detail}")
    model = None
    if engine is not None and card is not None:
        model = ModelInfo(
            file=engine.model_path.name, trained=card.trained, license=card.license, source=card.source,
            architecture=card.architecture, exporter=card.exporter, notes=card.notes,
            load_seconds=round(engine.load_seconds, 3), deformable_attention=engine.deformable_attention,
            winograd_convolutions=engine.winograd_convolutions, feedforward_blocks=engine.feedforward_blocks,
            linear_layers=engine.linear_layers, softmax_nodes=engine.softmax_nodes,
            int8_convolutions=engine.int8_convolutions, int8_group_norms=engine.int8_group_norms,
            position_embeddings=engine.position_embeddings,
        )
    return InfoResponse(
        service="m2fp-service",
        version=__version__,
        status=slot.status,
        detail=None if slot.status == "ready" else slot.detail,
        warnings=warnings,
        trained=card.trained if card else None,
        model=model,
        classes=card.parsing_classes if card else [],
        palette=[list(c) for c in card.palette[: len(card.parsing_classes)]] if card else [],
        input_policy=asdict(card.input_policy) if card else None,
        inference=asdict(card.inference) if card else None,
        outputs=OUTPUT_DOCS,
        label_sets=label_sets(card.palette if card else None),
        limits=_limits(settings),
        workers={"workers": settings.workers, "queue_size": settings.queue_size,
                 "threads_per_worker": settings.threads_per_worker(), "mode": "threads, one shared session",
                 "mask_resolution": settings.mask_resolution},
        api_key_required=settings.api_key is not None,
        versions=dict(versions()),
    )
