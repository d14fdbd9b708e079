"""Reference vs ours on one 720p photo: end-to-end time and peak memory, ratios from one run.

The reference is what a ModelScope user runs: PyTorch eager forward of ModelScope's ``M2FP``
plus ModelScope's own post-processing (``ImageHumanParsingPipeline.preprocess`` ->
``.forward`` (network + ``M2FP.postprocess`` with ``instance_parsing_inference`` at full
resolution) -> ``.postprocess``). Ours is ``ParsingEngine`` + ``pipeline.parse_array`` +
rendering the colour map to a base64 PNG, from the decoded RGB array; JPEG decoding is timed on
its own line.

Both run on the same weights (``m2fp_export.source.random_init(config, seed, confident=True)``,
checked against the ONNX file's model card) and the same photo, each path in its own fresh
subprocess so that the process peak RSS (``VmHWM``) belongs to that path alone. Each child uses
2 threads, warms up once untimed and reports the median of ``--repeat`` timed runs.

Usage::

    python bench/reference_vs_ours.py --model models/m2fp-bench.onnx --config cihp-r101 \
        --repeat 3 --out bench/results/reference_vs_ours.json

The ONNX file must come from ``m2fp export --random-init --confident --seed 0 -o PATH``
(with ``--config tiny`` for the tiny configuration).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import emit  # noqa: E402  (bench/ is the script directory)
from PIL import Image

THREADS = 2
PHOTO_WH = (1280, 720)
CHILD_KINDS = ("reference", "ours-exact", "ours-fast")
# A round where other processes kept more than this many cores busy on average is flagged noisy.
NOISY_CORES = 0.2


# --------------------------------------------------------------------------------------------
# Shared helpers (parent and children)
# --------------------------------------------------------------------------------------------


def make_photo() -> np.ndarray:
    """The benchmark photo: scikit-image's astronaut twice side by side, resized to 1280x720.

    Returns:
        (720, 1280, 3) uint8 RGB array (two people).
    """
    from skimage import data

    astronaut = data.astronaut()
    pair = np.concatenate([astronaut, astronaut], axis=1)
    return np.asarray(Image.fromarray(pair).resize(PHOTO_WH, Image.Resampling.BILINEAR))


def proc_status() -> dict[str, float]:
    """Current and peak resident set size of this process, in MB, from ``/proc/self/status``."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def memory_report(baseline: dict[str, float], peak: dict[str, float]) -> dict[str, float]:
    """The two memory figures the harness reports.

    Args:
        baseline: ``proc_status()`` right after imports + model build.
        peak: ``proc_status()`` at the end of the timed runs.

    Returns:
        ``peak_rss_mb``: the process peak RSS (VmHWM) as is; ``baseline_rss_mb``: RSS after
        imports + model build; ``peak_minus_baseline_mb``: what running the image added on top.
    """
    return {
        "peak_rss_mb": peak["VmHWM"],
        "baseline_rss_mb": baseline["VmRSS"],
        "peak_minus_baseline_mb": peak["VmHWM"] - baseline["VmRSS"],
    }


# --------------------------------------------------------------------------------------------
# Child: the reference (PyTorch eager + ModelScope pipeline)
# --------------------------------------------------------------------------------------------


def child_reference(args: argparse.Namespace) -> dict[str, Any]:
    """Times ModelScope's ``ImageHumanParsingPipeline`` on the photo.

    Returns:
        A JSON-able dict: timings (end to end, preprocess, forward, network alone, ModelScope's
        model post-processing, pipeline post-processing), memory, the weights' source and, for
        the parent's sanity checks, the class logits, label map and people count.
    """
    import torch

    torch.set_num_threads(THREADS)
    from m2fp_export.source import random_init

    loaded = random_init(args.config, seed=args.seed, confident=True)
    # Imported after random_init: that installs the mmcv deformable-attention shim ModelScope needs.
    from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline

    model = loaded.model
    model_dir = Path(args.scratch) / "reference-model-dir"  # the parent removes scratch afterwards
    model_dir.mkdir(exist_ok=True)
    config = {"framework": "pytorch", "task": "image-segmentation", "pipeline": {"type": "image-human-parsing"},
              "model": loaded.model_cfg}
    (model_dir / "configuration.json").write_text(json.dumps(config))
    model.model_dir = str(model_dir)
    pipe = ImageHumanParsingPipeline(model=model, device="cpu")

    # ``pipe.forward`` calls ``model(input)`` = ``model.postprocess(model.forward(input))``; a
    # timing shim on the instance separates the network from ModelScope's post-processing. It
    # keeps the one-argument ``input`` signature ModelScope inspects to pass the dict through.
    network_forward = model.forward
    last: dict[str, Any] = {}

    def timed_forward(input: dict[str, Any]) -> dict[str, Any]:  # noqa: A002 - ModelScope's name
        t = time.perf_counter()
        out = network_forward(input)
        last["network_s"] = time.perf_counter() - t
        last["class_logits"] = out["outputs"]["pred_logits"][0].numpy().copy()
        return out

    model.forward = timed_forward
    photo = Image.open(args.photo_png)
    photo.load()
    baseline = proc_status()

    runs: list[dict[str, float]] = []
    checks: dict[str, Any] = {}
    for i in range(args.repeat + 1):
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        inputs = pipe.preprocess(photo)
        t1 = time.perf_counter()
        out = pipe.forward(inputs)
        t2 = time.perf_counter()
        result = pipe.postprocess(out)
        t3 = time.perf_counter()
        cpu = cpu_seconds() - c0
        if i == args.repeat:  # last run: keep what the parent compares (outside the timed window)
            parsing = out["eval_result"][0]["parsing"]
            checks = {
                "label_map": parsing["semantic_outputs"].argmax(0).numpy().astype(np.uint8),
                "class_logits": last["class_logits"],
                "people": sum(1 for label in result["labels"] if label == "human"),
                "instances": len(result["labels"]),
            }
        del inputs, out, result
        if i == 0:
            continue  # warm-up
        runs.append({
            "end_to_end_s": t3 - t0, "preprocess_s": t1 - t0, "forward_s": t2 - t1,
            "network_s": last["network_s"], "model_postprocess_s": t2 - t1 - last["network_s"],
            "pipeline_postprocess_s": t3 - t2, "cpu_s": cpu,
        })
    peak = proc_status()
    np.save(Path(args.scratch) / "reference_label_map.npy", checks.pop("label_map"))
    np.save(Path(args.scratch) / "reference_class_logits.npy", checks.pop("class_logits"))
    return {
        "kind": "reference",
        "source": loaded.source,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "median": {k: median([r[k] for r in runs]) for k in runs[0]},
        "memory": memory_report(baseline, peak),
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------
# Child: ours (ONNX Runtime engine + numpy/OpenCV post-processing), no torch
# --------------------------------------------------------------------------------------------


def child_ours(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Times ``ParsingEngine`` + ``pipeline.parse_array`` + rendering, and JPEG decoding apart.

    Args:
        args: parsed command line (model, photo files, repeat, scratch dir).
        mode: ``exact`` or ``fast`` post-processing.

    Returns:
        A JSON-able dict: per-stage timings, memory, the model card's source, and the checks.
    """
    from m2fp_service import pipeline
    from m2fp_service.engine import ParsingEngine
    from m2fp_service.imaging import preprocess, render
    from m2fp_service.imaging.decode import decode_image

    engine = ParsingEngine(Path(args.model), intra_op_threads=THREADS)
    palette = engine.card.palette
    photo = np.asarray(Image.open(args.photo_png).convert("RGB"))
    jpeg = Path(args.photo_jpeg).read_bytes()
    baseline = proc_status()

    runs: list[dict[str, float]] = []
    label_map = None
    people = parts = 0
    for i in range(args.repeat + 1):
        t = time.perf_counter()
        decoded = decode_image(jpeg, max_pixels=50_000_000, max_side=16384).rgb
        decode_s = time.perf_counter() - t
        del decoded
        timings = pipeline.Timings()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        result = pipeline.parse_array(engine, photo, mode=mode, timings=timings)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        png_b64 = render.b64_png(render.colorize(result.label_map, palette))
        t2 = time.perf_counter()
        cpu = cpu_seconds() - c0
        if i == args.repeat:
            label_map, people = result.label_map, len(result.person_scores)
            parts = len(result.parts)
        del result, png_b64
        if i == 0:
            continue  # warm-up
        runs.append({
            "end_to_end_s": t2 - t0, "parse_s": t1 - t0, "render_s": t2 - t1, "decode_s": decode_s,
            "end_to_end_with_decode_s": t2 - t0 + decode_s, "cpu_s": cpu,
            **{f"{stage}_s": s for stage, s in timings.seconds.items()},
        })
    peak = proc_status()
    assert label_map is not None
    np.save(Path(args.scratch) / f"ours_{mode}_label_map.npy", label_map)
    checks: dict[str, Any] = {"people": people, "instances": people + parts}
    if mode == "exact":  # raw class logits for the same-weights check, after the peak is taken
        tensor, meta = preprocess.prepare(photo, engine.card.input_policy)
        np.save(Path(args.scratch) / "ours_class_logits.npy", engine.run(tensor).class_logits)
        checks["padded_input_hw"] = list(meta.padded_hw)
    return {
        "kind": f"ours-{mode}",
        "source": engine.card.source,
        "intra_op_threads": THREADS,
        "torch_imported": "torch" in sys.modules,
        "runs": runs,
        "median": {k: median([r[k] for r in runs]) for k in runs[0]},
        "memory": memory_report(baseline, peak),
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(kind: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Runs one measurement in a fresh interpreter and returns its JSON result."""
    out = scratch / f"{kind}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", str(args.model),
           "--config", args.config, "--seed", str(args.seed), "--repeat", str(args.repeat),
           "--scratch", str(scratch), "--photo-png", str(scratch / "photo.png"),
           "--photo-jpeg", str(scratch / "photo.jpg"), "--child-out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="ignore")
    load_before = os.getloadavg()[0]
    busy0, mine0 = busy_cpu_seconds(), children_cpu_seconds()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    others = (busy_cpu_seconds() - busy0) - (children_cpu_seconds() - mine0)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    result["child_wall_s"] = wall
    # Average number of cores other processes kept busy while this child ran (noise indicator).
    result["other_processes_cores"] = max(others, 0.0) / wall
    result["loadavg_1min_before"] = load_before
    result["loadavg_1min_after"] = os.getloadavg()[0]
    return result


def machine() -> dict[str, Any]:
    """What this box is, for the record."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    versions = {}
    for name in ("onnxruntime", "torch", "modelscope", "numpy", "cv2", "PIL"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - informational only
            versions[name] = None
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "packages": versions}


def check_same_weights(name: str, source: dict[str, Any], config: str, seed: int) -> None:
    """Refuses to compare unless ``source`` is exactly ``random_init(config, seed, confident=True)``.

    Args:
        name: what ``source`` describes, for the error message.
        source: the ONNX model card's ``source``, or ``LoadedModel.source`` of the reference.
        config: built-in configuration name.
        seed: random-init seed.

    Raises:
        SystemExit: on any difference.
    """
    want = {"kind": "random-init", "config": config, "seed": seed, "confident": True}
    if {k: source.get(k) for k in want} != want:
        raise SystemExit(f"{name} source {source} is not {want}: export the model with "
                         f"`m2fp export --random-init --confident --config {config} --seed {seed} -o PATH`")


def compare_outputs(scratch: Path) -> dict[str, Any]:
    """Numbers that show both sides computed the same thing (not part of the timing)."""
    ref_logits = np.load(scratch / "reference_class_logits.npy")
    our_logits = np.load(scratch / "ours_class_logits.npy")
    ref_map = np.load(scratch / "reference_label_map.npy")
    out: dict[str, Any] = {
        "class_logits_max_rel_diff": float(np.abs(ref_logits - our_logits).max()
                                           / max(float(np.abs(ref_logits).max()), 1e-12)),
    }
    for mode in ("exact", "fast"):
        ours = np.load(scratch / f"ours_{mode}_label_map.npy")
        out[f"label_agreement_{mode}"] = float((ours == ref_map).mean()) if ours.shape == ref_map.shape else None
    out["reference_classes_present"] = int(len(np.unique(ref_map)))
    return out


def pool(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Merges the rounds per path: medians over all timed runs, the highest peak of any round.

    Args:
        rounds: one ``{kind: child result}`` per round.

    Returns:
        ``{kind: result}`` shaped like one child's result.
    """
    pooled = {}
    for kind in CHILD_KINDS:
        per_round = [r[kind] for r in rounds]
        runs = [run for r in per_round for run in r["runs"]]
        worst = max(per_round, key=lambda r: r["memory"]["peak_rss_mb"])
        pooled[kind] = {
            **per_round[-1],
            "runs": runs,
            "median": {k: median([run[k] for run in runs]) for k in runs[0]},
            "memory": worst["memory"],
            "other_processes_cores": statistics.fmean(r["other_processes_cores"] for r in per_round),
        }
    return pooled


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios against the reference, all from this run."""
    ref = results["reference"]
    summary: dict[str, Any] = {}
    for kind in ("ours-exact", "ours-fast"):
        ours = results[kind]
        summary[kind] = {
            "speedup_end_to_end": ref["median"]["end_to_end_s"] / ours["median"]["end_to_end_s"],
            # Other processes only ever add time, so the fastest run is the least disturbed one.
            "speedup_end_to_end_best_runs": min(r["end_to_end_s"] for r in ref["runs"])
            / min(r["end_to_end_s"] for r in ours["runs"]),
            "speedup_end_to_end_with_decode": ref["median"]["end_to_end_s"]
            / ours["median"]["end_to_end_with_decode_s"],
            "speedup_network": ref["median"]["network_s"] / ours["median"]["infer_s"],
            # CPU seconds per run: less sensitive to other processes than wall time (both use 2 threads).
            "cpu_seconds_ratio": ref["median"]["cpu_s"] / ours["median"]["cpu_s"],
            "peak_rss_fraction": ours["memory"]["peak_rss_mb"] / ref["memory"]["peak_rss_mb"],
            "peak_minus_baseline_fraction": ours["memory"]["peak_minus_baseline_mb"]
            / ref["memory"]["peak_minus_baseline_mb"],
        }
        summary[kind]["meets_2x_speed"] = summary[kind]["speedup_end_to_end"] >= 2.0
        summary[kind]["meets_third_memory"] = summary[kind]["peak_rss_fraction"] <= 1.0 / 3.0
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The results as markdown tables."""
    res, summ = report["results"], report["summary"]
    ref = res["reference"]
    lines = [
        f"Photo {PHOTO_WH[0]}x{PHOTO_WH[1]} (model input {report['padded_input_hw'][0]}x"
        f"{report['padded_input_hw'][1]} padded), config `{report['config']}`, {THREADS} threads, "
        f"{report['rounds_run']} round(s) x {report['repeat']} timed runs per path (each child warms up once), "
        f"medians over all timed runs, peak = highest of the rounds; {report['date']}.",
        "",
        "| path | end to end, median (s) | speed-up vs ref | best run (s) | speed-up, best runs | "
        "peak RSS (MB) | peak vs ref | peak − baseline (MB) | vs ref | baseline RSS (MB) | "
        "other processes (cores busy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict[str, Any], cells: tuple[str, str, str, str]) -> str:
        m = r["memory"]
        speed, best_speed, peak_frac, delta_frac = cells
        best = min(run["end_to_end_s"] for run in r["runs"])
        return (f"| {name} | {r['median']['end_to_end_s']:.3f} | {speed} | {best:.3f} | {best_speed} | "
                f"{m['peak_rss_mb']:.0f} | {peak_frac} | {m['peak_minus_baseline_mb']:.0f} | {delta_frac} | "
                f"{m['baseline_rss_mb']:.0f} | {r['other_processes_cores']:.2f} |")

    lines.append(row("reference: PyTorch eager + ModelScope pipeline", ref, ("1.00x", "1.00x", "1.00", "1.00")))
    for kind in ("ours-exact", "ours-fast"):
        s = summ[kind]
        lines.append(row(f"ours, `{kind.split('-')[1]}` post-processing", res[kind],
                         (f"**{s['speedup_end_to_end']:.2f}x**", f"{s['speedup_end_to_end_best_runs']:.2f}x",
                          f"**{s['peak_rss_fraction']:.2f}**", f"{s['peak_minus_baseline_fraction']:.2f}")))
    lines += [
        "",
        "Where the time goes (medians, s):",
        "",
        "| path | preprocess | network | post-process | render / pipeline post | end to end | "
        "JPEG decode (apart) | with decode | CPU s per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| reference | {ref['median']['preprocess_s']:.3f} | {ref['median']['network_s']:.3f} | "
        f"{ref['median']['model_postprocess_s']:.3f} | {ref['median']['pipeline_postprocess_s']:.3f} | "
        f"{ref['median']['end_to_end_s']:.3f} | – | – | {ref['median']['cpu_s']:.2f} |",
    ]
    for kind in ("ours-exact", "ours-fast"):
        m = res[kind]["median"]
        lines.append(f"| {kind} | {m['preprocess_s']:.3f} | {m['infer_s']:.3f} | {m['postprocess_s']:.3f} | "
                     f"{m['render_s']:.3f} | {m['end_to_end_s']:.3f} | {m['decode_s']:.3f} | "
                     f"{m['end_to_end_with_decode_s']:.3f} | {m['cpu_s']:.2f} |")
    lines += ["", "Per round (end to end s; speed-up; peak RSS MB; other processes' cores busy):", "",
              "| round | reference | ours exact | ours fast | CPU-s ratio exact / fast |", "|---|---|---|---|---:|"]
    for n, rnd in enumerate(report["rounds"], 1):
        r, sm = rnd["results"], rnd["summary"]
        cells = [f"{r['reference']['median']['end_to_end_s']:.2f} s; 1.00x; "
                 f"{r['reference']['memory']['peak_rss_mb']:.0f}; {r['reference']['other_processes_cores']:.2f}"]
        cells += [f"{r[k]['median']['end_to_end_s']:.2f} s; {sm[k]['speedup_end_to_end']:.2f}x; "
                  f"{r[k]['memory']['peak_rss_mb']:.0f}; {r[k]['other_processes_cores']:.2f}"
                  for k in ("ours-exact", "ours-fast")]
        noisy = max(r[k]["other_processes_cores"] for k in CHILD_KINDS) > NOISY_CORES
        lines.append(f"| {n}{' (noisy)' if noisy else ''} | {' | '.join(cells)} | "
                     f"{sm['ours-exact']['cpu_seconds_ratio']:.2f}x / {sm['ours-fast']['cpu_seconds_ratio']:.2f}x |")
    c = report["checks"]
    lines += [
        "",
        f"Targets: end to end >= 2x faster: exact {'PASS' if summ['ours-exact']['meets_2x_speed'] else 'FAIL'}, "
        f"fast {'PASS' if summ['ours-fast']['meets_2x_speed'] else 'FAIL'}; peak RSS <= 1/3 of the reference: "
        f"exact {'PASS' if summ['ours-exact']['meets_third_memory'] else 'FAIL'}, "
        f"fast {'PASS' if summ['ours-fast']['meets_third_memory'] else 'FAIL'}.",
        f"Same work: class logits max rel diff {c['class_logits_max_rel_diff']:.1e}; label agreement with the "
        f"reference: exact {c['label_agreement_exact']:.4f}, fast {c['label_agreement_fast']:.4f}; people found: "
        f"reference {ref['checks']['people']}, exact {res['ours-exact']['checks']['people']}, "
        f"fast {res['ours-fast']['checks']['people']}.",
        "Peak RSS is the child process's VmHWM as is; baseline is its RSS right after imports + model "
        "build (the reference: weights + ModelScope pipeline; ours: ORT session incl. its small warm-up run). "
        "'other processes' is the average number of this box's cores other processes kept busy during "
        "that path's whole child run (from /proc/stat), a measure of how noisy its numbers are.",
    ]
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> int:
    """Builds the photo, runs the three children, checks, reports."""
    from m2fp_service.engine import read_card

    card = read_card(args.model)
    check_same_weights(f"{args.model} model card", card.source, args.config, args.seed)
    photo = make_photo()
    with tempfile.TemporaryDirectory(prefix="m2fp-bench-") as tmp:
        scratch = Path(tmp)
        Image.fromarray(photo).save(scratch / "photo.png")
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=90)
        (scratch / "photo.jpg").write_bytes(buf.getvalue())
        rounds: list[dict[str, dict[str, Any]]] = []
        for n in range(args.rounds):
            rounds.append({})
            for kind in CHILD_KINDS:
                print(f"round {n + 1}/{args.rounds}: {kind} ({args.repeat} timed runs + 1 warm-up) ...",
                      file=sys.stderr, flush=True)
                rounds[-1][kind] = run_child(kind, args, scratch)
        results = pool(rounds)
        check_same_weights("the reference's random_init", results["reference"]["source"], args.config, args.seed)
        if results["reference"]["source"] != card.source:
            raise SystemExit(f"reference source {results['reference']['source']} != card source {card.source}")
        checks = compare_outputs(scratch)
    if any(results[k]["torch_imported"] for k in ("ours-exact", "ours-fast")):
        raise SystemExit("the 'ours' child imported torch; its memory figure would be wrong")
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(args.model), "config": args.config, "seed": args.seed, "repeat": args.repeat,
        "photo": {"what": "skimage.data.astronaut() twice side by side, PIL bilinear to 1280x720",
                  "jpeg_bytes": len(buf.getvalue()), "jpeg_quality": 90},
        "padded_input_hw": results["ours-exact"]["checks"]["padded_input_hw"],
        "threads": THREADS,
        "machine": machine(),
        "card_source": card.source,
        "rounds_run": args.rounds,
        "results": results,
        "summary": summarize(results),
        "rounds": [{"results": r, "summary": summarize(r)} for r in rounds],
        "checks": checks,
    }
    emit(report, markdown, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="ONNX file from `m2fp export --random-init "
                        "--confident`")
    parser.add_argument("--config", default="cihp-r101", help="built-in configuration the model was exported from")
    parser.add_argument("--seed", type=int, default=0, help="random-init seed the model was exported with")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per path (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the three paths this many times in turn (reference, exact, fast, reference, "
                        "...); the headline pools all timed runs, a second table shows each round")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    # Internal: one measurement in a child process.
    parser.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--photo-png", help=argparse.SUPPRESS)
    parser.add_argument("--photo-jpeg", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1:
        parser.error("--repeat and --rounds must be >= 1")
    if args.child is None:
        return parent(args)
    result = child_reference(args) if args.child == "reference" else child_ours(args, args.child.split("-")[1])
    Path(args.child_out).write_text(json.dumps(result, default=_jsonable))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
