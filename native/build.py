"""Builds the native kernels into ``src/m2fp_service/native/``; each is optional (without it the same
results come from standard code, slower).

- ``libm2fp_msda.so`` (``m2fp_msda.cc``, ``m2fp_winograd.cc``, ``m2fp_ffn.cc``, ``m2fp_softmax.cc``,
  ``m2fp_posembed.cc``, ``m2fp_qffn.cc``): the custom-op library (fused deformable attention, Winograd
  convolutions, the fused feed-forward block and linear layer, the masked attention's softmax, the sine
  position embedding, the INT8 feed-forward block and
  linear layer; on x86-64 the products of the two fused float ops are built twice more, for AVX2 + FMA and
  for AVX-512, and the widest the CPU runs is picked at run time, and the INT8 ops' blocks once more for AMX
  tiles and AVX-512 VNNI). It needs ONNX Runtime's C/C++ API headers, which the
  onnxruntime wheel does not ship. They come from Debian's ``libonnxruntime-dev`` package (fetched
  from the Debian archive, checked against a pinned SHA-256, cached in ``~/.cache/m2fp``): the C API
  is versioned and backward compatible, so a library built against 1.21's headers
  (``ORT_API_VERSION`` 21) loads in any newer runtime. Needs a C++17 compiler (``$CXX``, default
  ``c++``).
- ``libm2fp_post.so`` (``m2fp_post.c``; ``m2fp_post_avx2.c`` and ``m2fp_post_avx512.c`` build its
  per-pixel kernels again for those x86-64 levels, each with its own vector width; ``m2fp_resize.c``):
  post-processing's and compositing's fused per-pixel loops, preprocessing's resize and the class masks'
  PNG rows, plain C with no dependencies, loaded through ctypes (``imaging/fused.py``).
  Needs a C compiler (``$CC``, default ``cc``).

Only Python's standard library is used.

    python native/build.py                    # both, into src/m2fp_service/native/
    python native/build.py msda -o /opt/lib/libm2fp_msda.so
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "m2fp_service" / "native"
HEADERS_DEB = "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
HEADERS_URL = "http://deb.debian.org/debian/pool/main/o/onnxruntime/" + HEADERS_DEB
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m2fp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DORT_API_MANUAL_INIT", "-Wno-psabi",
         "-Wall", "-Wextra"]
# No -ffast-math: NaN and the order of additions stay as written. Without trapping maths the
# compiler may turn the loops' selects into blends, `omp simd` lets it vectorise the sums, and
# fp-contract lets it fuse multiply-adds (ISO C mode would forbid it).
POST_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-trapping-math",
              "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd", "-Wall", "-Wextra", "-Wno-psabi"]


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a ``.deb`` (an ``ar`` archive): name -> bytes."""
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{HEADERS_DEB} is not an ar archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def headers() -> Path:
    """The folder with ``onnxruntime_lite_custom_op.h`` and the headers it includes (fetched once)."""
    folder = CACHE / "onnxruntime-headers-1.21.0"
    if (folder / "onnxruntime_lite_custom_op.h").is_file():
        return folder
    deb = CACHE / HEADERS_DEB
    if not deb.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"fetching ONNX Runtime's headers: {HEADERS_URL}", file=sys.stderr)
        with urllib.request.urlopen(HEADERS_URL, timeout=60) as response:  # noqa: S310 - pinned URL and hash
            payload = response.read()
        if hashlib.sha256(payload).hexdigest() != HEADERS_SHA256:
            raise SystemExit(f"{HEADERS_URL}: SHA-256 does not match the pinned {HEADERS_SHA256}")
        deb.write_bytes(payload)
    payload = deb.read_bytes()
    if hashlib.sha256(payload).hexdigest() != HEADERS_SHA256:
        deb.unlink()
        raise SystemExit(f"{deb}: damaged (SHA-256 mismatch); removed, run again")
    data = next(v for k, v in _ar_members(payload).items() if k.startswith("data.tar"))
    tmp = folder.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("./usr/include/onnxruntime/") and member.name.endswith(".h"):
                target = tmp / member.name.removeprefix("./usr/include/onnxruntime/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    tmp.replace(folder)
    return folder


def _compile(command: list[str], output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    print(" ".join([*command, "-o", str(tmp)]), file=sys.stderr)
    subprocess.run([*command, "-o", str(tmp)], check=True)
    tmp.replace(output)  # a running server keeps the old file it mapped
    return output


def build_msda(output: Path) -> Path:
    include = headers()
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    sources = [str(HERE / name) for name in ("m2fp_msda.cc", "m2fp_winograd.cc", "m2fp_ffn.cc", "m2fp_ffn_kernel.cc",
                                             "m2fp_softmax.cc", "m2fp_posembed.cc")]
    with tempfile.TemporaryDirectory() as tmp:
        extra: list[str] = []
        if platform.machine().lower() in ("x86_64", "amd64"):
            # The feed-forward and linear products once more for AVX2 + FMA and once for AVX-512 (the
            # widest the CPU runs is picked at run time; see m2fp_ffn_kernel.cc). A build the compiler
            # cannot make is left out, the others stay.
            builds = {"v3": ["-mavx2", "-mfma"], "v4": ["-mavx2", "-mfma", "-mavx512f", "-DM2FP_FFN_LANES=16"]}
            for level, isa in builds.items():
                obj = Path(tmp) / f"m2fp_ffn_kernel_{level}.o"
                command = [*compiler, *FLAGS, f"-I{include}", *isa, f"-DM2FP_FFN_PRODUCT=m2fp_ffn_product_{level}",
                           "-c", str(HERE / "m2fp_ffn_kernel.cc"), "-o", str(obj)]
                print(" ".join(command), file=sys.stderr)
                if subprocess.run(command, check=False).returncode == 0:
                    extra += [f"-DM2FP_FFN_{level.upper()}", str(obj)]
                else:
                    print(f"the {level} build of the feed-forward and linear products failed: left out",
                          file=sys.stderr)
        extra += _qffn_objects(compiler, include, Path(tmp))
        return _compile([*compiler, *FLAGS, f"-I{include}", *sources, *extra], output)


def _qffn_objects(compiler: list[str], include: Path, tmp: Path) -> list[str]:
    """The INT8 feed-forward and linear ops (``m2fp_qffn.cc``), convolution (``m2fp_qconv.cc``) and group norm
    (``m2fp_qgroupnorm.cc``) and, on x86-64 where the compiler has AMX, their blocks on AMX tiles or with AVX-512
    VNNI (``m2fp_qffn_x86.cc``), as objects. Multiplies and adds stay apart (``-ffp-contract=off``): every build
    then gives the bits ONNX Runtime's nodes give (the group norm: the bits its numpy reference gives)."""
    flags = [*compiler, *FLAGS, "-ffp-contract=off", f"-I{include}"]
    defines: list[str] = []
    objects: list[str] = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        obj = tmp / "m2fp_qffn_x86.o"
        command = [*flags, "-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                   "-mavx512vnni",
                   "-Wno-maybe-uninitialized",  # GCC 12 warns inside its own AVX-512 headers
                   "-c", str(HERE / "m2fp_qffn_x86.cc"), "-o", str(obj)]
        print(" ".join(command), file=sys.stderr)
        if subprocess.run(command, check=False).returncode == 0:
            defines, objects = ["-DM2FP_QFFN_X86"], [str(obj)]
        else:
            print("the AMX/VNNI build of the INT8 ops' blocks failed: left out (plain loops only)", file=sys.stderr)
    for name in ("m2fp_qffn", "m2fp_qconv", "m2fp_qgroupnorm"):
        obj = tmp / f"{name}.o"
        command = [*flags, *defines, "-c", str(HERE / f"{name}.cc"), "-o", str(obj)]
        print(" ".join(command), file=sys.stderr)
        subprocess.run(command, check=True)
        objects.append(str(obj))
    return objects


# Its translation units: the AVX2 and AVX-512 ones are empty unless the build is for x86-64's levels.
POST_SOURCES = [HERE / name for name in ("m2fp_post.c", "m2fp_post_avx2.c", "m2fp_post_avx512.c", "m2fp_resize.c")]


def build_post(output: Path) -> Path:
    compiler = shlex.split(os.environ.get("CC", "cc"))
    return _compile([*compiler, *POST_FLAGS, *map(str, POST_SOURCES)], output)


TARGETS = {"msda": (build_msda, "libm2fp_msda.so"), "post": (build_post, "libm2fp_post.so")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"what to build: {', '.join(TARGETS)} (default: all)")
    parser.add_argument("-o", "--output", type=Path, help="where to write the library (one target only)")
    args = parser.parse_args()
    targets = args.targets or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if args.output is not None and len(targets) != 1:
        parser.error("-o/--output needs exactly one target")
    failed = []
    for name in targets:
        build, filename = TARGETS[name]
        try:
            print(build(args.output or PACKAGE / filename))
        except (OSError, subprocess.CalledProcessError, SystemExit) as e:
            print(f"{name}: not built ({e})", file=sys.stderr)
            failed.append(name)
    if failed:
        raise SystemExit(f"not built: {', '.join(failed)}")


if __name__ == "__main__":
    main()
