"""Wall time of the default one-command pipeline (`kochat-trl pipeline`), per stage.

Runs `kochat_trl.pipeline.run_pipeline` (embedded tiny default, the bundled tiny/pipeline.yaml) in a fresh
process with `--threads` torch threads (OMP_NUM_THREADS) and prints its `report["wall_time_s"]` (SFT, RM, PPO,
merge, decoding; the stages run in that process, so the imports are paid once, in the total) and the whole
process's wall time, with the load average and the share of CPU time other processes took meanwhile. The start-up
row is the process's wall time less its stages: Python, the imports, building the tiny base, the report. With
several runs each row shows min / median / max.

    python benchmarks/bench_pipeline.py                 # one run
    python benchmarks/bench_pipeline.py --repeats 3     # min / median / max of three
    python benchmarks/bench_pipeline.py --config FILE   # another pipeline config (the tests' smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

RUN = (
    "import json, sys\nfrom kochat_trl.pipeline import run_pipeline\n"
    "report = run_pipeline(sys.argv[3] or None, sys.argv[1], overwrite=True)\n"
    "json.dump(report, open(sys.argv[2], 'w', encoding='utf-8'), ensure_ascii=False)\n"
)


def _busy_seconds() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(args: argparse.Namespace, scratch: Path, index: int) -> dict[str, Any]:
    out = scratch / f"report-{index}.json"
    busy, children, started = _busy_seconds(), _children_seconds(), time.perf_counter()
    load_start = os.getloadavg()[0]
    process = subprocess.run(
        [sys.executable, "-c", RUN, str(scratch / f"run-{index}"), str(out), str(args.config or "")],
        cwd=harness.REPO,
        env=harness.worker_env(args.threads),
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise harness.BenchmarkError(f"pipeline failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    foreign = (_busy_seconds() - busy) - (_children_seconds() - children)
    report = json.loads(out.read_text(encoding="utf-8"))
    return {
        "wall_time_s": report["wall_time_s"],
        "total_s": wall,
        "load1_start": load_start,
        "load1_after": os.getloadavg()[0],
        "foreign_cpu": max(0.0, foreign) / (wall * (os.cpu_count() or 1)),
        "sft_eval_loss": [report["sft"]["eval_loss_start"], report["sft"]["eval_loss_end"]],
        "rm_accuracy": report["rm"]["accuracy"],
        "ppo_reward": [report["ppo"]["reward_before"], report["ppo"]["reward_after"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="pipeline config (default: the bundled tiny one)")
    harness.add_common_arguments(parser, repeats=1)
    parser.set_defaults(timeout=1200.0)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise harness.BenchmarkError("the default pipeline is the CPU tiny default; use --device cpu")
    scratch = harness.scratch_dir(args, "pipeline")
    gate = harness.Gate.from_args(args)
    runs = []
    for index in range(args.repeats):
        for attempt in range(gate.retries + 1):
            load, waited = gate.wait_quiet()
            run = run_once(args, scratch, f"{index}-{attempt}")
            run.update(
                {
                    "load1_before": round(load, 2),
                    "waited_s": round(waited, 1),
                    "clean": load < gate.max_load and run["foreign_cpu"] <= gate.max_foreign,
                }
            )
            runs.append(run)
            print(
                f"[bench] pipeline run {index}.{attempt}: {run['total_s']:.1f} s  {run['wall_time_s']}  "
                f"load1 {load:.2f}->{run['load1_after']:.2f}  foreign {100 * run['foreign_cpu']:.1f}%"
                f"{'' if run['clean'] else '  CONTENDED'}",
                flush=True,
            )
            if run["clean"]:
                break
    used = [run for run in runs if run["clean"]] or runs
    stages = list(used[0]["wall_time_s"])
    for run in runs:
        run["startup_s"] = run["total_s"] - sum(run["wall_time_s"].values())
    spread = {stage: [run["wall_time_s"][stage] for run in used] for stage in stages}
    spread["start-up (imports, base)"] = [run["startup_s"] for run in used]
    spread["total (process)"] = [run["total_s"] for run in used]
    medians = {stage: statistics.median(values) for stage, values in spread.items()}
    total = medians["total (process)"]
    rows = [
        [
            stage,
            f"{min(values):.1f} / {medians[stage]:.1f} / {max(values):.1f}",
            f"{100 * medians[stage] / total:.0f} %",
        ]
        for stage, values in spread.items()
    ]
    table = harness.markdown_table(["stage", "seconds (min / median / max)", "share of the median total"], rows)
    clean = sum(run["clean"] for run in runs)
    markdown = (
        f"### Default pipeline wall time (tiny default, CPU, {args.threads} threads)\n\n{table}\n\n"
        f"median of {len(used)} run(s), {clean}/{len(runs)} clean; load1 before "
        f"{statistics.median(run['load1_before'] for run in used):.2f}, foreign CPU "
        f"{100 * statistics.median(run['foreign_cpu'] for run in used):.1f} %"
    )
    print("\n" + markdown)
    payload = {
        "benchmark": "pipeline",
        "command": harness.command_line(),
        "machine": harness.machine_info(args.threads, "cpu"),
        "gate": vars(gate),
        "median_s": medians,
        "total_s": total,
        "runs": runs,
    }
    harness.finish(args, scratch, "pipeline-cpu", payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
