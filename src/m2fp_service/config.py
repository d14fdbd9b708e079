"""All configuration, from environment variables prefixed ``M2FP_`` (or a .env file).

Nothing else in the package reads the environment: code takes a ``Settings`` explicitly,
so tests build their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from m2fp_service.limits import ImageLimits

DEFAULT_MODEL = Path("models/m2fp.onnx")
DEFAULT_LIGHT_MODEL = Path("models/light.onnx")
DEFAULT_LIGHT_LANDSCAPE_MODEL = Path("models/light-landscape.onnx")


class Settings(BaseSettings):
    """Service settings. Each field is documented in the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="M2FP_", env_file=".env", extra="ignore")

    model: Path = Field(DEFAULT_MODEL, description="Path of the exported ONNX model")
    light_model: Path = Field(DEFAULT_LIGHT_MODEL, description="Light per-frame segmenter, general variant (video, "
                                                               "live)")
    light_model_landscape: Path = Field(
        DEFAULT_LIGHT_LANDSCAPE_MODEL, description="Light segmenter, landscape variant, used for wide frames when the "
                                                   "file exists")
    host: str = Field("127.0.0.1", description="Address `m2fp serve` binds")
    port: int = Field(8000, ge=1, le=65535, description="Port `m2fp serve` binds")
    workers: int = Field(1, ge=1, le=64, description="Inference workers (concurrent ONNX Runtime runs)")
    intra_op_threads: int = Field(0, ge=0, le=256,
                                  description="ONNX Runtime intra-op threads per run; 0 = cores / workers")
    queue_size: int = Field(4, ge=0, le=10_000,
                            description="Requests allowed to wait for a worker; beyond it: 503 + Retry-After")
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request limit (queue wait + inference); 504 after")
    upload_timeout_s: float = Field(
        15.0, gt=0, description="Limit for receiving the upload; 408 after (a slow sender holds a pool place)")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest accepted upload (413 beyond)")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest accepted image, width x height (413 beyond)")
    max_side: int = Field(16384, ge=32, description="Longest accepted image side in pixels (413 beyond)")
    mask_resolution: Literal["exact", "fast"] = Field(
        "exact", description="Post-processing at full image resolution ('exact', as ModelScope) or at model "
                            "input resolution, upsampled at the end ('fast'; a photo of at most twice the model "
                            "input's pixels is processed exactly, which is faster there)")
    result_cache_mb: int = Field(
        128, ge=0, le=65536, description="Memory for parsing results of recently seen pictures (MiB; 0 = off): the "
                                         "same photo composed again skips inference")
    live_max_connections: int = Field(4, ge=1, le=1000, description="Open live WebSockets (producers and viewers)")
    live_max_frame_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest live frame message (bytes)")
    live_max_pixels: int = Field(1920 * 1080, ge=1, description="Largest live frame, width x height")
    live_keyframe_interval_s: float = Field(2.0, gt=0, description="Seconds between M2FP key frames of a live stream")
    input_profile: Literal["default", "fast"] | None = Field(
        None, description="Input size: 'default' (the reference's, short edge 640), 'fast' (short edge 384, for "
                          "live use; measured agreement in BENCHMARKS.md); unset = the model card's")
    ort_optimized_cache: bool = Field(
        True, description="Save ONNX Runtime's optimised graph once and load it on later starts (faster start-up)")
    ort_cache_dir: Path | None = Field(
        None, description="Folder for the optimised-graph cache; unset = beside the model file (if that is "
                          "read-only the server optimises in memory at each start and logs it)")
    ort_spinning: bool = Field(
        False, description="Let idle ONNX Runtime threads spin between ops (a little faster on a dedicated "
                           "machine, wasted CPU on a shared one)")
    msda_kernel: str = Field(
        "auto", description="The custom-op library (`make native`: fused deformable attention, Winograd "
                            "convolutions, fused feed-forward blocks and linear layers, masked softmaxes): 'auto' = "
                            "the one built into the package if present, 'off' = ONNX's standard ops and the graph as "
                            "exported, or a path to libm2fp_msda.so (must load)")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM/Ctrl-C: how long `m2fp serve` lets in-flight requests finish")
    max_connections: int = Field(
        200, ge=1, le=100_000,
        description="Open connections (idle keep-alive ones included) `m2fp serve` accepts at once; 503 beyond")
    api_key: str | None = Field(
        None,
        description="If set, every /api/* request needs `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS (empty: no cross-origin access)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    log_json: bool = Field(True, description="Structured JSON logs (one object per line)")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("input_profile", "ort_cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_key_is_none(cls, value: object) -> object:
        if isinstance(value, str):  # M2FP_API_KEY= (empty) means no key, not an empty one
            return value.strip() or None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_pixels=self.max_pixels, max_side=self.max_side)

    def threads_per_worker(self) -> int:
        """intra-op threads for each worker's session run."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, (os.cpu_count() or 1) // self.workers)

