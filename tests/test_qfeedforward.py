"""INT8 feed-forward blocks as one op (``qfeedforward.rewrite`` + ``native/m2fp_qffn.cc``: ai.m2fp::QFeedForward).

The op is checked bit for bit against a float32 numpy reference of what ONNX Runtime's quantize-dequantize
nodes compute: on AMX tiles here, with AVX-512 VNNI and with the plain loops in child processes
(M2FP_QFFN_KERNEL=avx512-vnni, =generic). The
rewrite is checked against ONNX Runtime running the chain it replaces, and against the chains it must leave
alone byte for byte; the engine on the tiny INT8 model against the same engine without the INT8 rewrite.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from m2fp_export.quantize import PRESETS, cpu_flags, quantize_file
from m2fp_service import engine as engine_module
from m2fp_service import feedforward, qfeedforward, rewrite
from m2fp_service.engine import BUILT_MSDA_KERNEL, EngineOptions, ParsingEngine, session_options

# The built library: a failure in CI, a skip elsewhere when it is missing (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("kernel_library")

Operands = dict[str, np.ndarray]
TIE_COLUMNS = 8  # w1's first columns are 0: their hidden values are b1 / h_scale = k + 0.5 (ties with TIES)


def qffn_kernel() -> str:
    return engine_module.int8_products(BUILT_MSDA_KERNEL)


def products(a: np.ndarray, zero_point: int, w: np.ndarray) -> np.ndarray:
    """a (rows, depth) uint8 @ w (depth, n) int8 - zero_point x w's column sums, exactly (int64; the float64
    sums of these integers are below 2**53)."""
    acc = (a.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)
    return acc - zero_point * w.astype(np.int64).sum(0)  # type: ignore[no-any-return]


def dequantized(acc: np.ndarray, in_scale: Any, w_scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float32(acc) x float32(in_scale x w_scale), then + bias: each a float32 operation."""
    mult = np.float32(np.asarray(in_scale).item()) * w_scale.astype(np.float32)
    return acc.astype(np.float32) * mult + bias  # type: ignore[no-any-return]


def reference(o: Operands) -> tuple[np.ndarray, np.ndarray]:
    """(y, the hidden layer as uint8) as the op computes them."""
    d, e = o["w1"].shape[0], o["w2"].shape[1]
    hs, hz = np.float32(o["h_scale"].item()), int(o["h_zero_point"].item())
    with np.errstate(invalid="ignore"):
        v = dequantized(products(o["x"].reshape(-1, d), int(o["x_zero_point"].item()), o["w1"]), o["x_scale"],
                        o["w1_scale"], o["b1"])
        v = np.where(v < 0, np.float32(0), v) / hs  # relu (NaN stays), then QuantizeLinear's division
        v = np.where(v > -hz, v, np.float32(-hz))  # max(v, low) as max_ps: NaN -> low
        v = np.where(v < 255 - hz, v, np.float32(255 - hz))
        hidden = (np.rint(v).astype(np.int32) + hz).astype(np.uint8)  # half to even
        y = dequantized(products(hidden, hz, o["w2"]), hs, o["w2_scale"], o["b2"])
    return y.reshape(*o["x"].shape[:-1], e), hidden


def operands(lead: tuple[int, ...], d: int, f: int, e: int, *, seed: int = 0, x_zp: int = 128, h_zp: int = 37,
             per_column: bool = True, scalars: tuple[int, ...] = (), fill: int | None = None, extreme: bool = False,
             nonfinite: bool = False, hs: float = 0.0173) -> Operands:
    """The op's 11 operands in order: x (*lead, d) (all ``fill`` if given), weights of -128 and 127 only when
    ``extreme``, scales that make about half the hidden units > 0; the first TIE_COLUMNS hidden columns at
    k + 0.5 (exact rounding ties when ``hs`` is a power of 2), the next 4 saturated; NaN, +inf, -inf in both
    biases when ``nonfinite`` (their hidden bytes: 0, 255, the zero point)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (*lead, d), dtype=np.uint8) if fill is None else np.full((*lead, d), fill, np.uint8)

    def draw(shape: tuple[int, int]) -> np.ndarray:
        if extreme:
            return rng.choice(np.array([-128, 127], np.int8), shape)
        return rng.integers(-128, 128, shape, dtype=np.int8)

    w1, w2 = draw((d, f)), draw((f, e))
    w1[:, :TIE_COLUMNS] = 0
    if extreme:  # two columns of one value: sums as far from 0 as D allows
        w1[:, TIE_COLUMNS + 4:TIE_COLUMNS + 6] = [-128, 127]
    xs = np.float32(0.02)
    spread = max(float(products(x.reshape(-1, d), x_zp, w1).std()), 1.0) if x.size else 1.0

    def scale(n: int, factor: float) -> np.ndarray:
        s = rng.uniform(0.5, 1.5, n) * factor
        return (s if per_column else s[:1].reshape(scalars)).astype(np.float32)

    b1, b2 = (0.5 * rng.standard_normal(f)).astype(np.float32), rng.standard_normal(e).astype(np.float32)
    b1[:TIE_COLUMNS] = (25 * np.arange(TIE_COLUMNS) + 0.5) * np.float32(hs)
    b1[TIE_COLUMNS:TIE_COLUMNS + 4] = 100.0
    if nonfinite:
        b1[TIE_COLUMNS + 4:TIE_COLUMNS + 7] = b2[:3] = [np.nan, np.inf, -np.inf]

    def scalar(value: Any, dtype: type) -> np.ndarray:
        return np.full(scalars, value, dtype)

    return {"x": x, "x_scale": scalar(xs, np.float32), "x_zero_point": scalar(x_zp, np.uint8), "w1": w1,
            "w1_scale": scale(f, 1 / (float(xs) * spread)), "b1": b1, "h_scale": scalar(hs, np.float32),
            "h_zero_point": scalar(h_zp, np.uint8), "w2": w2, "w2_scale": scale(e, 1e-3 / hs), "b2": b2}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = session_options(2)
    so.register_custom_ops_library(str(BUILT_MSDA_KERNEL))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_op(o: Operands, op: str = "QFeedForward") -> np.ndarray:
    """One ai.m2fp::QFeedForward node (or ``op``) whose operands are graph inputs, run on ``o``."""
    graph = helper.make_graph(
        [helper.make_node(op, list(o), ["y"], domain=feedforward.DOMAIN)], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
         for n, a in o.items()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.m2fp", 1)])
    return session(model).run(None, o)[0]  # type: ignore[no-any-return]


TIES = 2.0**-5  # an h_scale that makes the first TIE_COLUMNS hidden units exact halves
CASES: dict[str, tuple[tuple[int, ...], int, int, int, dict[str, Any]]] = {  # x's leading dims, D, F, E, options
    "1-row-ties": ((1,), 64, 64, 32, {"hs": TIES}),
    "31-rows": ((31,), 128, 192, 96, {}),
    "32-rows-h-zp-0-ties": ((32,), 64, 64, 32, {"h_zp": 0, "hs": TIES}),
    "33-rows": ((33,), 256, 1024, 256, {}),
    "100-rows-x-zp-0": ((100,), 128, 192, 96, {"x_zp": 0}),
    "1000-rows-ties": ((1000,), 256, 1024, 256, {"seed": 1, "hs": TIES}),
    "3-d-x-zp-255-scalars-(1)": ((2, 50), 64, 64, 32, {"x_zp": 255, "scalars": (1,)}),
    "per-tensor-scales": ((45,), 128, 192, 96, {"per_column": False}),
    "per-tensor-scales-(1)-ties": ((45,), 128, 192, 96, {"per_column": False, "scalars": (1,), "h_zp": 0, "hs": TIES}),
    "x-all-0-zp-255-extreme-weights": ((40,), 8192, 64, 32, {"fill": 0, "x_zp": 255, "extreme": True}),
    "x-all-255-zp-0-extreme-weights": ((40,), 1024, 128, 64, {"fill": 255, "x_zp": 0, "extreme": True}),
    "nonfinite-biases": ((70,), 64, 128, 64, {"nonfinite": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_the_reference_bit_for_bit(case: str) -> None:
    """Rows in 32-row blocks and tails (1, 31, 32, 33, 100, 1000; a 3-D x), D/F/E from 64/64/32 to 8192 deep
    (sums beyond float32's 2**24: int32 to float rounding), per-column and per-tensor scales, scalars of shape
    () and (1), zero points 0, 37, 128, 255, x all 0 or 255 with weights of -128 and 127, rounding ties (half
    to even), saturation, NaN and infinite biases: y is the reference's, bit for bit (NaN where it has NaN)."""
    lead, d, f, e, options = CASES[case]
    o = operands(lead, d, f, e, **options)
    got = run_op(o)
    want, hidden = reference(o)
    assert got.dtype == np.float32 and got.shape == want.shape == (*lead, e)
    assert np.array_equal(got, want, equal_nan=True)
    # not a trivial result: the hidden layer spreads out, the relu zeroes some units but not all, y varies
    rest = hidden[:, TIE_COLUMNS + 4:]
    assert np.unique(rest).size >= 3 and 0 < float((rest == o["h_zero_point"].item()).mean()) < 1
    assert np.unique(got[np.isfinite(got)]).size > 1
    if options.get("extreme"):  # int32 sums of up to 255 x 128 x D, beyond float32's 2**24
        assert np.abs(products(o["x"], options["x_zp"], o["w1"])).max() >= 255 * 127 * d
    if options.get("nonfinite"):  # hidden: NaN -> 0 (as ONNX Runtime), +inf saturates, -inf -> the zero point
        hz = o["h_zero_point"].item()
        assert hz != 0 and (hidden[:, TIE_COLUMNS + 4:TIE_COLUMNS + 7] == [0, 255, hz]).all()
        assert np.isnan(got[..., 0]).all() and (got[..., 1] == np.inf).all() and (got[..., 2] == -np.inf).all()


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0-rows", "2x0-rows"])
def test_an_empty_x_gives_an_empty_y(lead: tuple[int, ...]) -> None:
    got = run_op(operands(lead, 64, 64, 32))
    assert got.shape == (*lead, 32) and got.dtype == np.float32


def changed(**arrays: np.ndarray) -> Operands:
    return {**operands((4,), 64, 64, 32), **arrays}


def f32(*shape: int, value: float = 1.0) -> np.ndarray:
    return np.full(shape, value, np.float32)


def i8(*shape: int) -> np.ndarray:
    return np.ones(shape, np.int8)


HOSTILE: dict[str, tuple[Operands, str]] = {
    "D-48": (changed(x=np.ones((4, 48), np.uint8), w1=i8(48, 64)),
             r"D and F must be multiples of 64 and E of 32; w1 \(48, 64\), w2 \(64, 32\)"),
    "F-96": (changed(w1=i8(64, 96), w1_scale=f32(96), b1=f32(96), w2=i8(96, 32)),
             r"D and F must be multiples of 64 and E of 32; w1 \(64, 96\), w2 \(96, 32\)"),
    "E-16": (changed(w2=i8(64, 16), w2_scale=f32(16), b2=f32(16)),
             r"D and F must be multiples of 64 and E of 32; w1 \(64, 64\), w2 \(64, 16\)"),
    "w1-rows": (changed(w1=i8(128, 64)),
                r"w1 must be \(D, F\) with D = x's last dimension; x \(4, 64\), w1 \(128, 64\)"),
    "w2-rows": (changed(w2=i8(128, 32)), r"w2 must be \(F, E\) with F = w1's columns; w1 \(64, 64\), w2 \(128, 32\)"),
    "w2-rank-3": (changed(w2=i8(1, 64, 32)), r"w2 must be \(F, E\)"),
    "w1-scale-(32)": (changed(w1_scale=f32(32)), r"w1_scale must be a scalar or \(F\), not \(32\)"),
    "w1-scale-(1,64)": (changed(w1_scale=f32(1, 64)), r"w1_scale must be a scalar or \(F\), not \(1, 64\)"),
    "w2-scale-(64)": (changed(w2_scale=f32(64)), r"w2_scale must be a scalar or \(E\), not \(64\)"),
    "b1-(32)": (changed(b1=f32(32)), r"b1 must be \(F\) = \(64\), not \(32\)"),
    "b1-scalar": (changed(b1=f32()), r"b1 must be \(F\) = \(64\), not \(\)"),
    "b2-(1,32)": (changed(b2=f32(1, 32)), r"b2 must be \(E\) = \(32\), not \(1, 32\)"),
    **{f"h-scale-{v}": (changed(h_scale=f32(value=v)), r"h_scale must be a positive finite number")
       for v in (0.0, -0.0, -0.5, np.nan, np.inf, -np.inf)},
    "h-scale-(2)": (changed(h_scale=f32(2)), r"x_scale and h_scale must be scalars"),
    "x-scale-(64)": (changed(x_scale=f32(64)), r"x_scale and h_scale must be scalars"),
    "x-zp-(2)": (changed(x_zero_point=np.zeros(2, np.uint8)), r"x_zero_point and h_zero_point must be scalars"),
    "h-zp-(1,1)": (changed(h_zero_point=np.zeros((1, 1), np.uint8)), r"x_zero_point and h_zero_point must be scalars"),
    "x-scalar": (changed(x=np.array(1, np.uint8)), r"x must have a last dimension"),
    "D-65600": (changed(x=np.ones((1, 65600), np.uint8), w1=i8(65600, 64)), r"D and F must be at most 65536"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_are_refused(case: str) -> None:
    """Widths that are not multiples of the tiles, weights, scales, biases or zero points of the wrong shape, an
    h_scale that is not a positive finite number: refused with the op's own message, not run."""
    o, message = HOSTILE[case]
    with pytest.raises((ort_errors.InvalidArgument, ort_errors.Fail), match=r"ai\.m2fp::QFeedForward: " + message):
        run_op(o)


def linear_operands(lead: tuple[int, ...], d: int, e: int, *, seed: int = 4, x_zp: int = 128,
                    per_column: bool = True, scalars: tuple[int, ...] = (), nonfinite: bool = False) -> Operands:
    """ai.m2fp::QLinear's 6 operands in order: x (*lead, d), its scale and zero point, w (d, e) int8, its scale
    (per column, or one of shape ``scalars``), b (e) (NaN, +inf, -inf first when ``nonfinite``)."""
    rng = np.random.default_rng(seed)
    s = (rng.uniform(0.5, 1.5, e) * 1e-3).astype(np.float32)
    b = rng.standard_normal(e).astype(np.float32)
    if nonfinite:
        b[:3] = [np.nan, np.inf, -np.inf]
    return {"x": rng.integers(0, 256, (*lead, d), dtype=np.uint8), "x_scale": np.full(scalars, 0.02, np.float32),
            "x_zero_point": np.full(scalars, x_zp, np.uint8), "w": rng.integers(-128, 128, (d, e), dtype=np.int8),
            "w_scale": s if per_column else s[:1].reshape(scalars), "b": b}


LINEAR_CASES: dict[str, tuple[tuple[int, ...], int, int, dict[str, Any]]] = {  # x's leading dims, D, E, options
    "1-row": ((1,), 64, 32, {}),
    "33-rows": ((33,), 256, 256, {}),
    "1000-rows-x-zp-0": ((1000,), 256, 256, {"x_zp": 0}),
    "3-d-per-tensor-(1)": ((2, 50), 128, 96, {"per_column": False, "scalars": (1,)}),
    "per-tensor-()": ((45,), 192, 64, {"per_column": False}),
    "nonfinite-biases": ((70,), 64, 64, {"nonfinite": True}),
    "0-rows": ((0,), 64, 32, {}),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_op_matches_the_reference_bit_for_bit(case: str) -> None:
    """ai.m2fp::QLinear (one quantized layer, float output: MatMulIntegerToFloat and the bias Add): rows in
    32-row blocks and tails, a 3-D x, per-column and per-tensor scales, zero points 0 and 128, NaN and infinite
    biases, no rows: y is the reference's, bit for bit."""
    lead, d, e, options = LINEAR_CASES[case]
    o = linear_operands(lead, d, e, **options)
    got = run_op(o, "QLinear")
    want = dequantized(products(o["x"].reshape(-1, d), int(o["x_zero_point"].item()), o["w"]), o["x_scale"],
                       o["w_scale"], o["b"]).reshape(*lead, e)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)
    assert got.size == 0 or np.unique(got).size > got.size // 2  # not a constant result


def linear_changed(**arrays: np.ndarray) -> Operands:
    return {**linear_operands((4,), 64, 32), **arrays}


LINEAR_HOSTILE: dict[str, tuple[Operands, str]] = {
    "D-48": (linear_changed(x=np.ones((4, 48), np.uint8), w=i8(48, 32)),
             r"D must be a multiple of 64 and E of 32; w \(48, 32\)"),
    "E-16": (linear_changed(w=i8(64, 16), w_scale=f32(16), b=f32(16)), r"D must be a multiple of 64 and E of 32"),
    "w-rows": (linear_changed(w=i8(128, 32)), r"w must be \(D, E\) with D = x's last dimension; x \(4, 64\)"),
    "w-scale-(64)": (linear_changed(w_scale=f32(64)), r"w_scale must be a scalar or \(E\), not \(64\)"),
    "b-(1,32)": (linear_changed(b=f32(1, 32)), r"b must be \(E\) = \(32\), not \(1, 32\)"),
    "x-scale-(2)": (linear_changed(x_scale=f32(2)), r"x_scale and x_zero_point must be scalars"),
    "x-scalar": (linear_changed(x=np.array(1, np.uint8)), r"x must have a last dimension"),
    "D-65600": (linear_changed(x=np.ones((1, 65600), np.uint8), w=i8(65600, 32)), r"D must be at most 65536"),
}


@pytest.mark.parametrize("case", list(LINEAR_HOSTILE))
def test_linear_hostile_inputs_are_refused(case: str) -> None:
    o, message = LINEAR_HOSTILE[case]
    with pytest.raises((ort_errors.InvalidArgument, ort_errors.Fail), match=r"ai\.m2fp::QLinear: " + message):
        run_op(o, "QLinear")


def widest_kernel(cap: str | None) -> str:
    """The build of the INT8 ops' blocks this CPU runs under M2FP_QFFN_KERNEL=``cap``: AMX where the CPU has
    AMX-TILE and AMX-INT8 (and Linux grants the tiles, as here), else AVX-512 VNNI where it has AVX-512
    F/BW/VL/DQ and VNNI, else the plain loops."""
    flags, x86 = cpu_flags(), platform.machine() == "x86_64"
    vnni = x86 and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags
    if cap == "generic" or not vnni:
        return "generic"
    return "amx" if cap != "avx512-vnni" and {"amx_tile", "amx_int8"} <= flags else "avx512-vnni"


def test_the_widest_build_this_cpu_runs_is_the_one_chosen() -> None:
    """m2fp_qffn_kernel(): "amx", "avx512-vnni" or "generic" as the CPU allows, capped by M2FP_QFFN_KERNEL (the
    child processes of the next test)."""
    assert qffn_kernel() == widest_kernel(os.environ.get("M2FP_QFFN_KERNEL"))


@pytest.mark.parametrize("cap", ["avx512-vnni", "generic"])
def test_every_narrower_build_gives_the_same_bits(cap: str) -> None:
    """M2FP_QFFN_KERNEL=avx512-vnni or =generic (read once per process) caps the op's blocks at AVX-512 VNNI or
    the plain loops: every op test of this module passes on them too, in a child process that says which ran
    (on a CPU without AVX-512 VNNI the first runs the plain loops too)."""
    # the op cases, the empty x's, the hostile inputs, the kernel probe; QLinear's cases and hostile inputs
    passes_capped(cap, __file__, "op_matches or empty_x or hostile or one_chosen",
                  len(CASES) + 2 + len(HOSTILE) + 1 + len(LINEAR_CASES) + len(LINEAR_HOSTILE))


def passes_capped(cap: str, test_file: str, selection: str, passed: int) -> None:
    """Under M2FP_QFFN_KERNEL=``cap`` (read once per process) the library says it runs the build this CPU allows
    under that cap (widest_kernel), and the tests of ``test_file`` that ``selection`` picks all pass in a child
    process: ``passed`` of them."""
    env = {**os.environ, "M2FP_QFFN_KERNEL": cap}
    probe = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.m2fp_qffn_kernel.restype = ctypes.c_char_p; "
             "print(lib.m2fp_qffn_kernel().decode())")
    which = subprocess.run([sys.executable, "-c", probe, str(BUILT_MSDA_KERNEL)], env=env, capture_output=True,
                           text=True, check=True)
    assert which.stdout.strip() == widest_kernel(cap)
    child = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-k", selection],
                           env=env, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stdout[-3000:]
    assert re.search(rf"\b{passed} passed, \d+ deselected", child.stdout), child.stdout[-500:]


def chain(d: int = 64, f: int = 128, e: int = 64, *, act: str = "Relu", bias_first: bool = False,
          per_column: bool = True, h_zp: int = 0, nan_bias: bool = False, identity_bias: bool = False,
          seed: int = 2) -> onnx.ModelProto:
    """x float (1, N, D) -> QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(w1_q, axis 1)) ->
    Add(b1) -> act -> QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(w2_q)) -> Add(b2) -> y, as
    a static INT8 export writes a feed-forward block (each bias on the left of its Add with ``bias_first``; a
    NaN in b1's first value with ``nan_bias``; b1 an Identity copy of initialiser b1src with ``identity_bias``)."""
    rng = np.random.default_rng(seed)

    def weight(depth: int, n: int, in_scale: float) -> list[np.ndarray]:
        s = (rng.uniform(0.5, 1.5, n) / (in_scale * 3700 * np.sqrt(depth))).astype(np.float32)
        shape = (n,) if per_column else ()
        return [rng.integers(-128, 128, (depth, n), dtype=np.int8), s if per_column else s[0].reshape(()),
                np.zeros(shape, np.int8)]

    arrays: list[np.ndarray] = [
        np.array(0.02, np.float32), np.array(128, np.uint8), *weight(d, f, 0.02),
        (0.5 * rng.standard_normal(f)).astype(np.float32), np.array(2.0**-5, np.float32), np.array(h_zp, np.uint8),
        *weight(f, e, 2.0**-5), rng.standard_normal(e).astype(np.float32)]
    inits = dict(zip(["xs", "xz", "w1q", "s1", "z1", "b1", "hs", "hz", "w2q", "s2", "z2", "b2"], arrays, strict=True))
    if nan_bias:
        inits["b1"][0] = np.nan

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
        if op == "Add" and bias_first:
            inputs = inputs[::-1]
        return helper.make_node(op, inputs, [out], name=f"{op}_{out}", **attrs)

    nodes = [node("QuantizeLinear", ["x", "xs", "xz"], "xq"), node("DequantizeLinear", ["xq", "xs", "xz"], "xd"),
             node("DequantizeLinear", ["w1q", "s1", "z1"], "w1", axis=1), node("MatMul", ["xd", "w1"], "p1"),
             node("Add", ["p1", "b1"], "a1"), node(act, ["a1"], "r"), node("QuantizeLinear", ["r", "hs", "hz"], "hq"),
             node("DequantizeLinear", ["hq", "hs", "hz"], "hd"),
             node("DequantizeLinear", ["w2q", "s2", "z2"], "w2", axis=1), node("MatMul", ["hd", "w2"], "p2"),
             node("Add", ["p2", "b2"], "y")]
    if identity_bias:
        inits["b1src"] = inits.pop("b1")
        nodes.insert(0, helper.make_node("Identity", ["b1src"], ["b1"], name="b1_copy"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def copied(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def outputs(model: onnx.ModelProto, rows: int = 300, seed: int = 3) -> list[np.ndarray]:
    d = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    x = np.random.default_rng(seed).standard_normal((1, rows, d)).astype(np.float32)
    return session(model).run(None, {"x": x})  # type: ignore[no-any-return]


def assert_same(want: list[np.ndarray], got: list[np.ndarray]) -> None:
    assert len(want) == len(got) and all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    assert all(np.unique(a).size > 100 for a in want)


def needs_fast_kernel() -> None:
    if qffn_kernel() == "generic":
        pytest.skip("the engine applies the rewrite only where the op runs on AMX tiles or with AVX-512 VNNI, "
                    "which this CPU lacks")


@pytest.mark.parametrize("options", [{}, {"bias_first": True}, {"per_column": False}, {"h_zp": 9},
                                     {"h_zp": 9, "nan_bias": True}, {"identity_bias": True}],
                         ids=["bias-second", "bias-first", "per-tensor-scales", "hidden-zero-point-9", "nan-bias",
                              "bias-through-identity"])
def test_a_qdq_chain_becomes_one_node_with_the_same_bits(options: dict[str, Any]) -> None:
    """The chain (and the DequantizeLinear nodes of x and the weights, read by nothing else) becomes one
    QFeedForward node reading the quantized tensors, scales, zero points and biases; the count is returned and
    recorded; the ai.m2fp opset is added; ONNX Runtime's result is the unrewritten graph's, bit for bit."""
    model = chain(**options)
    fast = copied(model)
    assert qfeedforward.rewrite(fast) == 1
    assert [n.op_type for n in fast.graph.node] == ["QuantizeLinear", "QFeedForward"]
    node = fast.graph.node[1]
    assert (node.domain, list(node.output)) == ("ai.m2fp", ["y"])
    b1 = "b1src" if options.get("identity_bias") else "b1"  # the initialiser itself; its Identity copy goes
    assert list(node.input) == ["xq", "xs", "xz", "w1q", "s1", b1, "hs", "hz", "w2q", "s2", "b2"]
    assert {p.key: p.value for p in fast.metadata_props} == {qfeedforward.METADATA_KEY: "1"}
    assert [(o.domain, o.version) for o in fast.opset_import] == [("", 17), ("ai.m2fp", 1)]
    assert qfeedforward.rewrite(fast) == 0  # nothing left to fuse
    needs_fast_kernel()
    assert_same(outputs(model), outputs(fast))


def test_dequantized_tensors_read_elsewhere_are_kept() -> None:
    """x's and w1's DequantizeLinear outputs also read by another MatMul, w2's by a Neg: those nodes stay, the
    fused node reads the quantized tensors, and the graph runs with the same bits in every output."""
    model = chain()
    model.graph.node.extend([helper.make_node("MatMul", ["xd", "w1"], ["side"]),
                             helper.make_node("Neg", ["w2"], ["w2_neg"])])
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("side", "w2_neg")])
    fast = copied(model)
    assert qfeedforward.rewrite(fast) == 1
    assert [n.op_type for n in fast.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear",
                                                    "DequantizeLinear", "QFeedForward", "MatMul", "Neg"]
    assert fast.graph.node[4].input[0] == "xq" and [n.output[0] for n in fast.graph.node[1:4]] == ["xd", "w1", "w2"]
    needs_fast_kernel()
    assert_same(outputs(model), outputs(fast))


def test_dequantized_tensors_that_are_graph_outputs_are_kept() -> None:
    """x's and w1's DequantizeLinear outputs are graph outputs too (the chain is their only reader node): the
    nodes stay, and the graph runs with the same bits in every output."""
    model = chain()
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("xd", "w1")])
    fast = copied(model)
    assert qfeedforward.rewrite(fast) == 1
    assert [n.op_type for n in fast.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear",
                                                    "QFeedForward"]
    needs_fast_kernel()
    assert_same(outputs(model), outputs(fast))


def linear_chain(d: int = 128, e: int = 96, seed: int = 5) -> onnx.ModelProto:
    """x float (1, N, D) -> QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(w_q, axis 1)) -> Add(b)
    -> y, b a DequantizeLinear of int32 (how an INT8 model reads a float bias the exporter shares with a quantized
    convolution)."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(e)
    inits = {"xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8),
             "wq": rng.integers(-128, 128, (d, e), dtype=np.int8),
             "ws": (rng.uniform(0.5, 1.5, e) * 1e-3).astype(np.float32), "wz": np.zeros(e, np.int8),
             "bq": np.round(b * 4096).astype(np.int32), "bs": np.full(e, 1 / 4096, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
             helper.make_node("MatMul", ["xd", "w"], ["p"]),
             helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], axis=0),  # after the MatMul
             helper.make_node("Add", ["p", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_qdq_linear_layer_becomes_one_node_with_the_same_bits() -> None:
    """``rewrite_linear``: the layer (and its DequantizeLinear nodes of x and w) becomes one QLinear node reading
    the quantized tensors and the dequantized bias (a constant: its node stays), placed after it (where the Add
    was: the graph stays sorted); the count is recorded; ONNX Runtime's result is the unrewritten graph's, bit
    for bit. A feed-forward block's layers are not taken again
    after ``rewrite`` (``rewrite.apply`` runs the two in that order)."""
    model = linear_chain()
    fast = copied(model)
    assert qfeedforward.rewrite(fast) == 0 and qfeedforward.rewrite_linear(fast) == 1
    assert [n.op_type for n in fast.graph.node] == ["QuantizeLinear", "DequantizeLinear", "QLinear"]
    assert list(fast.graph.node[2].input) == ["xq", "xs", "xz", "wq", "ws", "b"]
    known = {t.name for t in fast.graph.initializer} | {i.name for i in fast.graph.input}
    for node in fast.graph.node:  # topologically sorted: every input exists before its reader
        assert all(i in known for i in node.input if i), node.op_type
        known.update(node.output)
    assert {p.key: p.value for p in fast.metadata_props} == {qfeedforward.LINEAR_METADATA_KEY: "1"}
    block = copied(chain())
    counts = rewrite.apply(block, int8_feedforward=True)
    assert (counts["int8_feedforward_blocks"], counts["int8_linear_layers"]) == (1, 0)
    needs_fast_kernel()
    assert_same(outputs(model), outputs(fast))


def declined(kind: str) -> onnx.ModelProto:
    """A chain that ``qfeedforward.rewrite`` must leave alone (each a valid graph that runs as it is)."""
    d, f, e = {"D-48": (48, 128, 64), "F-96": (64, 96, 64), "E-16": (64, 128, 16), "axis-0": (64, 64, 64),
               "D-65600": (65600, 128, 64)}.get(kind, (64, 128, 64))
    model = chain(d, f, e, act="Sigmoid" if kind == "sigmoid" else "Relu")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.output[0]: n for n in graph.node}
    if kind == "hidden-scale-names":  # equal values, other initialisers: not the same quantization by name
        twins = [numpy_helper.from_array(numpy_helper.to_array(inits[n]), n + "2") for n in ("hs", "hz")]
        graph.initializer.extend(twins)
        nodes["hd"].input[1:] = ["hs2", "hz2"]
    elif kind == "weight-zero-point":
        inits["z1"].CopyFrom(numpy_helper.from_array(np.ones(128, np.int8), "z1"))
    elif kind == "uint8-weights":
        w1 = numpy_helper.to_array(inits["w1q"]).astype(np.int16) + 128
        inits["w1q"].CopyFrom(numpy_helper.from_array(w1.astype(np.uint8), "w1q"))
        inits["z1"].CopyFrom(numpy_helper.from_array(np.full(128, 128, np.uint8), "z1"))
    elif kind in ("p1-read-twice", "hq-read-twice"):
        graph.node.append(helper.make_node("Identity", [kind[:2]], ["side"]))
        graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT if kind[0] == "p" else
                                                          TensorProto.UINT8, None))
    elif kind == "relu-is-output":
        graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    elif kind == "weight-is-input":
        graph.initializer.remove(inits["w2q"])
        graph.input.append(helper.make_tensor_value_info("w2q", TensorProto.INT8, [128, 64]))
    elif kind == "axis-0":  # w1 (64, 64): a scale per row is valid too, but not the op's
        nodes["w1"].attribute[0].i = 0
    elif kind == "p1-in-a-subgraph":  # also read inside an If's branch
        branch = helper.make_graph([helper.make_node("Neg", ["p1"], ["p1_neg"])], "branch", [],
                                   [helper.make_tensor_value_info("p1_neg", TensorProto.FLOAT, None)])
        graph.initializer.append(numpy_helper.from_array(np.array(True), "yes"))
        graph.node.append(helper.make_node("If", ["yes"], ["side"], then_branch=branch, else_branch=branch))
        graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    elif kind == "hidden-scale-0":  # ONNX Runtime runs it (the hidden layer saturates); the op would refuse it
        inits["hs"].CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32), "hs"))
    return model


DECLINED = ["hidden-scale-names", "weight-zero-point", "uint8-weights", "D-48", "F-96", "E-16", "D-65600",
            "p1-read-twice",
            "hq-read-twice", "relu-is-output", "sigmoid", "weight-is-input", "axis-0", "p1-in-a-subgraph",
            "hidden-scale-0"]


@pytest.mark.parametrize("kind", DECLINED)
def test_chains_that_do_not_qualify_are_left_alone(kind: str) -> None:
    """Another scale for the hidden layer's DequantizeLinear, a nonzero weight zero point, uint8 weights, D or F
    not a multiple of 64, E not of 32, an intermediate read twice (also inside a subgraph) or a graph output,
    another activation, a weight that is a graph input, a scale per row of w1, a hidden scale of 0: untouched,
    byte for byte."""
    model = declined(kind)
    session(model)  # the graph is valid: the rewrite declines it, not ONNX Runtime
    before = model.SerializeToString()
    assert qfeedforward.rewrite(model) == 0
    assert model.SerializeToString() == before


# Few small calibration images keep the export quick (as tests/test_quantize.py does).
TEST_CONFIG = dataclasses.replace(PRESETS["avx2"], calibration_count=3, calibration_short_edge=256,
                                  min_label_agreement=0.5, min_person_iou=0.5)


@pytest.fixture(scope="module")
def int8_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    quantize_file(tiny_model_path, out, TEST_CONFIG, [], report=lambda _: None)
    return out


def test_the_tiny_int8_model_s_encoder_block_is_fused(int8_path: Path) -> None:
    """The tiny INT8 model has one block that qualifies: its encoder's one layer (D 64, F 128, E 64, per-column
    scales). The decoder's feed-forward layers stay float (the predictor is not quantized) and go to the float
    rewrite. ``rewrite.apply`` fuses the INT8 block only when asked; the float rewrites' counts are the same."""
    model = onnx.load(str(int8_path))
    plain, fused = copied(model), copied(model)
    counts, int8_counts = rewrite.apply(plain), rewrite.apply(fused, int8_feedforward=True)
    assert (counts["int8_feedforward_blocks"], int8_counts["int8_feedforward_blocks"]) == (0, 1)
    float_counts = {k: v for k, v in counts.items() if not k.startswith("int8_")}
    assert float_counts == {k: v for k, v in int8_counts.items() if not k.startswith("int8_")}
    assert float_counts["feedforward_blocks"] > 0
    (node,) = [n for n in fused.graph.node if n.op_type == "QFeedForward"]
    inits = {t.name: list(t.dims) for t in fused.graph.initializer}
    assert "/encoder/layers.0/" in node.name
    assert [inits[node.input[i]] for i in (3, 4, 8, 9)] == [[64, 128], [128], [128, 64], [64]]
    assert {p.key: p.value for p in fused.metadata_props}[qfeedforward.METADATA_KEY] == "1"


def test_the_engine_runs_the_int8_block_fused_with_the_same_outputs(int8_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the op runs on AMX tiles or with AVX-512 VNNI, the engine fuses the INT8 block too and counts it with
    the float ones (the counts the two rewrites give on the model); its raw outputs are, bit for bit, those of the
    same engine
    whose rewrite leaves INT8 layers alone (the decision function says "generic": real rewrites, real kernels)."""
    model = onnx.load(str(int8_path))
    float_blocks, int8_blocks = feedforward.rewrite(model), qfeedforward.rewrite(model)
    int8_layers, float_layers = qfeedforward.rewrite_linear(model), feedforward.rewrite_linear(model)
    # The encoder layer's block; its value and output projections and sampling offsets (its attention weights' 48
    # columns are not a multiple of 32); the decoder's 3 cross-attention layers' key and value projections.
    assert (int8_blocks, int8_layers) == (1, 9)
    options = EngineOptions(intra_op_threads=2, optimized_cache=False)
    fused = ParsingEngine(int8_path, options=options, warmup=False)
    fast = qffn_kernel() != "generic"
    assert fused.feedforward_blocks == float_blocks + (int8_blocks if fast else 0)
    assert fused.linear_layers == float_layers + (int8_layers if fast else 0)
    needs_fast_kernel()
    monkeypatch.setattr(engine_module, "int8_products", lambda kernel: "generic")
    plain = ParsingEngine(int8_path, options=options, warmup=False)
    assert (plain.feedforward_blocks, plain.linear_layers) == (float_blocks, float_layers)
    x = np.random.default_rng(13).uniform(0, 255, (1, 3, 128, 192)).astype(np.float32)
    want, got = plain.run(x), fused.run(x)
    assert np.unique(want.mask_logits).size > 100
    assert np.array_equal(want.class_logits, got.class_logits) and np.array_equal(want.mask_logits, got.mask_logits)


def test_the_cache_key_holds_the_int8_decision(int8_path: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimised graph keeps the INT8 rewrites or not: a cache written where the library ran the INT8 ops fast
    is not reused where it would not (M2FP_QFFN_KERNEL=generic, or an OS that refuses AMX's tiles on a CPU
    without VNNI), nor one with the convolutions on AMX tiles where the library runs VNNI (test_qconv.py)."""
    keys = {}
    for decision in ("amx", "avx512-vnni", "generic"):
        monkeypatch.setattr(engine_module, "int8_products", lambda kernel, d=decision: d)
        keys[decision] = engine_module.cache_path_for(int8_path, tmp_path, BUILT_MSDA_KERNEL)
        assert engine_module.int8_rewrites(BUILT_MSDA_KERNEL) is (decision != "generic")
    assert len(set(keys.values())) == 3
