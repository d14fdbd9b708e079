"""Obtains MediaPipe's selfie segmentation .tflite files from the mediapipe wheel on PyPI.

The models ship inside ``mediapipe==0.10.21`` (Apache-2.0). We download that one wheel with
``pip download --no-deps`` (no mediapipe install: it pins numpy<2 and pulls jax), extract the
two .tflite members and check their SHA-256 against the values recorded here. The wheel is
kept in a cache folder, so later exports (and machines without registry access that were given
the wheel or the .tflite file) work offline.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, HubUnavailable

MEDIAPIPE_VERSION = "0.10.21"
# One fixed platform wheel, so every machine downloads the same file (the .tflite members are
# platform independent; their hashes below are what is checked).
WHEEL_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311")
LICENSE = "Apache-2.0"


@dataclass(frozen=True)
class Variant:
    """One of the two selfie segmentation models in the wheel."""

    name: str
    member: str  # path inside the wheel
    sha256: str
    input_hw: tuple[int, int]


VARIANTS = {
    "general": Variant("general", "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
                       "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c", (256, 256)),
    "landscape": Variant("landscape", "mediapipe/modules/selfie_segmentation/selfie_segmentation_landscape.tflite",
                         "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd", (144, 256)),
}


class FetchError(ExportError):
    """The wheel or the .tflite file could not be obtained or does not match its recorded hash."""


class RegistryUnavailable(HubUnavailable):
    """PyPI could not be reached (the CLI exits 3, as for an unreachable ModelScope hub)."""


@dataclass(frozen=True)
class TfliteSource:
    """A .tflite file on disk and where it came from (recorded in the model card)."""

    path: Path
    variant: str
    sha256: str
    kind: str  # "pypi-wheel" or "file"
    wheel: str | None = None
    wheel_sha256: str | None = None
    member: str | None = None

    def card_fields(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "path" and v is not None}
        fields["package"] = f"mediapipe=={MEDIAPIPE_VERSION}" if self.kind == "pypi-wheel" else None
        fields["known"] = VARIANTS[self.variant].sha256 == self.sha256
        return {k: v for k, v in fields.items() if v is not None}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "m2fp"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_wheel(cache_dir: Path) -> Path | None:
    found = sorted(cache_dir.glob(f"mediapipe-{MEDIAPIPE_VERSION}-*.whl"))
    return found[0] if found else None


_NETWORK_HINTS = ("NewConnectionError", "ConnectionError", "Max retries exceeded", "Temporary failure in name",
                  "Name or service not known", "Network is unreachable", "timed out", "ProxyError",
                  "Connection refused", "SSLError")


def download_wheel(cache_dir: Path, timeout_s: float = 600) -> Path:
    """Returns the mediapipe wheel in ``cache_dir``, downloading it with pip if it is not there.

    Raises RegistryUnavailable when PyPI cannot be reached, FetchError on any other failure.
    """
    cached = _cached_wheel(cache_dir)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *WHEEL_PLATFORM,
               "--disable-pip-version-check", "-d", tmp, f"mediapipe=={MEDIAPIPE_VERSION}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RegistryUnavailable(
                f"pip download of mediapipe=={MEDIAPIPE_VERSION} timed out after {timeout_s:g} s") from exc
        wheels = sorted(Path(tmp).glob("mediapipe-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            # "(from versions: none)": the index listed no mediapipe at all, which PyPI always has, so
            # the index was not reached (pip says why only when it retries).
            if any(h in proc.stderr for h in _NETWORK_HINTS) or "(from versions: none)" in proc.stderr:
                raise RegistryUnavailable(f"PyPI is unreachable (pip download mediapipe=={MEDIAPIPE_VERSION}): {tail}")
            raise FetchError(f"pip download mediapipe=={MEDIAPIPE_VERSION} failed: {tail}")
        target = cache_dir / wheels[0].name
        os.replace(wheels[0], target)  # same filesystem: atomic, so a half-downloaded wheel is never cached
    return target


def extract_from_wheel(wheel: Path, variant: str, dest_dir: Path) -> TfliteSource:
    """Extracts one variant's .tflite from the wheel into ``dest_dir`` and checks its SHA-256."""
    v = VARIANTS[variant]
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(v.member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise FetchError(f"{wheel} is not a mediapipe wheel with {v.member}: {exc}") from exc
    digest = sha256_bytes(data)
    if digest != v.sha256:
        raise FetchError(f"{v.member} in {wheel.name} has SHA-256 {digest}, expected {v.sha256}: the wheel is "
                         "corrupt or not the recorded release; delete it and download again")
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / Path(v.member).name
    if not path.is_file() or sha256_file(path) != digest:
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".tflite-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private
        os.replace(tmp, path)
    return TfliteSource(path=path, variant=variant, sha256=digest, kind="pypi-wheel", wheel=wheel.name,
                        wheel_sha256=sha256_file(wheel), member=v.member)


def from_file(path: Path, variant: str, allow_unknown: bool = False) -> TfliteSource:
    """A .tflite the user gives. Its SHA-256 must be the recorded one unless ``allow_unknown``."""
    if not path.is_file():
        raise FetchError(f"{path} does not exist")
    digest = sha256_file(path)
    expected = VARIANTS[variant].sha256
    if digest != expected and not allow_unknown:
        other = [n for n, v in VARIANTS.items() if v.sha256 == digest]
        hint = (f" It is the {other[0]!r} variant: pass --variant {other[0]}." if other else
                " It is corrupt or another model; --allow-unknown-tflite converts it anyway "
                "(the parity check still runs).")
        raise FetchError(f"{path} has SHA-256 {digest}, not the recorded {variant} model's {expected}.{hint}")
    return TfliteSource(path=path, variant=variant, sha256=digest, kind="file")


def obtain(variant: str, *, wheel: Path | None = None, tflite: Path | None = None, cache_dir: Path | None = None,
           allow_unknown: bool = False) -> TfliteSource:
    """The .tflite of ``variant``: from ``tflite``, else ``wheel``, else the cached or downloaded wheel."""
    if variant not in VARIANTS:
        raise FetchError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if tflite is not None:
        return from_file(tflite, variant, allow_unknown)
    cache = cache_dir or default_cache_dir()
    if wheel is not None:
        if not wheel.is_file():
            raise FetchError(f"{wheel} does not exist")
        return extract_from_wheel(wheel, variant, cache)
    return extract_from_wheel(download_wheel(cache), variant, cache)
