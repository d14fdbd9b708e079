"""Deployment fixtures: the real ``kubectl kustomize`` render of deploy/k8s, and the Dockerfile.

kubectl comes from PATH or from the virtualenv's bin/ (``make kubectl`` puts it there when the
machine has none); without it the tests fail rather than skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The Kubernetes version whose schemas the rendered objects must satisfy (kubernetes-validate ships them).
K8S_VERSION = "1.32.0"
OVERLAYS = ("overlays/small", "overlays/production", "batch")
COMPONENTS = ("hpa-queue-depth", "servicemonitor", "model-volume", "model-export-init")

Obj = dict[str, Any]


def find_kubectl() -> str | None:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    return shutil.which("kubectl") or (str(venv_kubectl) if venv_kubectl.is_file() else None)


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = find_kubectl()
    if found is None:
        pytest.fail("kubectl not found on PATH or in the virtualenv: run `make kubectl`")
    return found


def _render(kubectl: str, folder: Path) -> list[Obj]:
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def render(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[Obj]]:
    """``render("overlays/production", components=("servicemonitor",))`` -> the rendered objects.

    Components are added through a kustomization in a temporary folder that refers to the
    committed ones by relative path (kustomize refuses absolute roots).
    """
    cache: dict[tuple[str, tuple[str, ...]], list[Obj]] = {}

    def go(target: str, components: Iterable[str] = ()) -> list[Obj]:
        key = (target, tuple(components))
        if key not in cache:
            if not key[1]:
                cache[key] = _render(kubectl, K8S / target)
            else:
                folder = tmp_path_factory.mktemp("kustomize")
                rel = Path(os.path.relpath(K8S, folder))
                # The overlays' namespace, as when the components are listed in the overlay itself.
                spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                        "namespace": "m2fp", "resources": [str(rel / target)],
                        "components": [str(rel / "components" / c) for c in key[1]]}
                (folder / "kustomization.yaml").write_text(yaml.safe_dump(spec))
                cache[key] = _render(kubectl, folder)
        return cache[key]

    return go


def one(objs: list[Obj], kind: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def container(obj: Obj, name: str = "m2fp") -> Obj:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)
