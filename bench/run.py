"""``make bench``: every benchmark on this machine in one go, then BENCHMARKS.md.

Order: models (exported into models/ if missing) -> floor (FLOPs, rates) -> network (pyperf)
-> the graph rewrites node by node (ORT profiles) -> end to end + start-up -> stages and palette
merge (pytest-benchmark) -> compositing (pytest-benchmark) -> video and live -> load (Locust) ->
report. Raw JSON goes to bench/results/
(gitignored); BENCHMARKS.md is generated from it.

Full run: about 20-30 minutes on an idle 2-core machine, an hour or more under heavy load. ``--quick`` (``make
bench QUICK=1``): the tiny model, one size, fewer repeats, short load levels: about 5 minutes;
its numbers only show that the harness works.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, ensure_models, loadavg, machine, models, write_json  # noqa: E402

BENCH = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="floor,network,rewrites,e2e,stages,compose,video,load",
                    help="comma-separated steps to run")
    args = ap.parse_args()
    started, t0 = dt.datetime.now().astimezone().isoformat(timespec="seconds"), time.perf_counter()
    run = {"started": started, "quick": args.quick, "loadavg_before": loadavg(), "machine": machine(), "notes": [],
           "steps": {}}
    m = models(args.quick)
    ensure_models(m, log=lambda s: print(s, file=sys.stderr, flush=True))
    RESULTS.mkdir(parents=True, exist_ok=True)
    q = ["--quick"] if args.quick else []
    py = sys.executable
    steps = {
        "floor": [py, str(BENCH / "floor.py"), *(["--rounds", "2", *q] if args.quick else ["--rounds", "9"])],
        "network": [py, str(BENCH / "network.py"), "-o", str(RESULTS / "network.json"), "--processes",
                    "1", "--values", "1" if args.quick else "2", "--tuning", *q],
        "rewrites": [py, str(BENCH / "rewrites.py"), *(["--rounds", "1", *q] if args.quick else ["--rounds", "4"])],
        "e2e": [py, str(BENCH / "e2e.py"), *(["--repeat", "1", "--startup-repeat", "1", *q] if args.quick
                                             else ["--repeat", "5", "--startup-repeat", "2"])],
        "stages": [py, "-m", "pytest", str(BENCH / "test_stages.py"), "-q", "-p", "no:cacheprovider",
                   "--benchmark-json", str(RESULTS / "stages.json"), "--benchmark-min-rounds", "3",
                   "--benchmark-max-time", "0.5" if args.quick else "2"],
        "compose": [py, "-m", "pytest", str(BENCH / "test_compose.py"), "-q", "-p", "no:cacheprovider",
                    "--benchmark-json", str(RESULTS / "compose.json"), "--benchmark-min-rounds", "5",
                    "--benchmark-max-time", "0.5" if args.quick else "1.5"],
        "video": [py, str(BENCH / "video.py"), *q],
        "load": [py, str(BENCH / "load.py"), *(["--seconds", "20", *q] if args.quick else ["--seconds", "60"])],
    }
    env = {"M2FP_BENCH_QUICK": "1"} if args.quick else {}
    import os

    for name in args.only.split(","):
        (RESULTS / f"{name}.json").unlink(missing_ok=True)
        (RESULTS / f"{name}-cpu.jsonl").unlink(missing_ok=True)
        print(f"== {name}: {' '.join(steps[name][1:])}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        rc = subprocess.run(steps[name], cwd=ROOT, env={**os.environ, **env}).returncode
        run["steps"][name] = {"seconds": round(time.perf_counter() - t, 1), "exit": rc, "loadavg_after": loadavg()}
        if rc:
            run["notes"].append(f"step {name} failed (exit {rc}); its section is missing or partial")
    run["loadavg_after"] = loadavg()
    run["duration_s"] = time.perf_counter() - t0
    write_json("run", run)
    return subprocess.run([py, str(BENCH / "report.py")], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
