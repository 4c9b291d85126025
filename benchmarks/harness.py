"""What every benchmark script shares: fresh worker processes, a quiet-machine gate, alternation, tables.

Each measured run is one `benchmarks/worker.py` process, so peak memory (RSS on CPU, the CUDA allocator's
peak on GPU) belongs to that run alone and no run inherits another's caches. Runs of the compared variants
alternate (A B A B ...), so slow drift of the machine hits every variant alike; medians are reported.

Timing under contention is meaningless, so before a run the 1-minute load average must be below
`--max-load`, and each worker measures the share of the machine's CPU time that other processes took
while its training loop ran (`foreign_cpu`, from /proc/stat minus its own CPU time). Runs above
`--max-foreign` are marked contended, retried, and left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
WORKER = Path(__file__).with_name("worker.py")
TINY_CONFIGS = REPO / "kochat_trl" / "configs" / "tiny"
STAGE_CONFIG = {"sft": "sft.yaml", "rm": "reward.yaml", "ppo": "ppo.yaml"}
MB = 1024**2
GIB = 1024**3


class BenchmarkError(SystemExit):
    """A setup problem (no CUDA, bad option): one line on stderr, exit code 2."""

    def __init__(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    group = parser.add_argument_group("measurement")
    group.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: peak RSS; cuda: torch.cuda.max_memory_allocated (fails without a GPU)",
    )
    group.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default 2)")
    group.add_argument("--repeats", type=int, default=repeats, help="measured runs per variant, alternated")
    group.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="wait before a run until the 1-min load average is below this (default threads + 1.5)",
    )
    group.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for a quiet machine per run")
    group.add_argument(
        "--max-foreign",
        type=float,
        default=0.10,
        help="a run whose loop saw more than this share of all CPU time used by other processes "
        "is contended: retried and left out of the medians",
    )
    group.add_argument("--retries", type=int, default=2, help="extra attempts for a contended run")
    group.add_argument("--timeout", type=float, default=600.0, help="seconds one worker may take")
    group.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    group.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder")
    group.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/NAME.json)")


def choices_list(option: str, text: str, known: Sequence[str] | None = None) -> list[str]:
    """A comma-separated option value as a list; with `known`, an unknown name stops with a one-line error."""
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if known is not None and name not in known]
    if unknown:
        raise BenchmarkError(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def default_profile(args: argparse.Namespace) -> str:
    """gpu on CUDA, tiny for the embedded default, small for the ~100M+ random models on CPU."""
    return "gpu" if args.device == "cuda" else "tiny" if args.model == "tiny" else "small"


def check_device(device: str) -> None:
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise BenchmarkError(
            "--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
            "run on a GPU machine with a CUDA build of torch, or use --device cpu"
        )


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    return env


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """The machine and library versions the figures were measured on."""
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "torch_threads": threads,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    return info


def load_stage_config(stage: str) -> dict[str, Any]:
    """The shipped tiny recipe config of `stage` as a dict (the benchmark's starting point)."""
    import yaml

    return yaml.safe_load((TINY_CONFIGS / STAGE_CONFIG[stage]).read_text(encoding="utf-8"))


@dataclass
class Gate:
    """When a run counts: quiet before it (load average) and quiet during its loop (foreign CPU share)."""

    max_load: float
    max_wait: float
    max_foreign: float
    retries: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Gate:
        max_load = args.max_load if args.max_load is not None else args.threads + 1.5
        return cls(max_load, args.max_wait, args.max_foreign, args.retries)

    def wait_quiet(self) -> tuple[float, float]:
        """Block until load1 < max_load and, over the last few seconds, other processes used at most
        max_foreign of the CPU (this process sleeps meanwhile), or until max_wait passes.

        Returns (load1, seconds waited). The busy sample reacts at once; load1 lags by about a minute.
        """
        import psutil

        started = time.monotonic()
        while True:
            sample = psutil.cpu_times_percent(interval=3)
            busy = 1 - (sample.idle + sample.iowait) / 100
            load = os.getloadavg()[0]
            if (load < self.max_load and busy <= self.max_foreign) or time.monotonic() - started >= self.max_wait:
                return load, time.monotonic() - started

    def clean(self, result: dict[str, Any], load_before: float) -> bool:
        return result.get("ok", False) and load_before < self.max_load and result["foreign_cpu"] <= self.max_foreign


@dataclass
class Variant:
    """One side of a comparison: a label and the worker spec that runs it."""

    label: str
    spec: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)


def run_worker(spec: dict[str, Any], env: dict[str, str], timeout: float, scratch: Path) -> dict[str, Any]:
    """Run one measured worker process; returns its result dict (ok False with the error tail on failure)."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "output_dir": str(scratch / "run")}
    spec_path, out_path = scratch / "spec.json", scratch / "result.json"
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        process = subprocess.run(
            [sys.executable, str(WORKER), str(spec_path), str(out_path)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, tail = process.returncode, (process.stdout + process.stderr)[-3000:]
    except subprocess.TimeoutExpired as expired:
        code = None
        tail = f"timed out after {timeout:.0f} s: {str(expired.stdout or '')[-1000:]}"
    wall = time.perf_counter() - started
    result = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else {}
    result.update({"ok": code == 0 and bool(result), "process_wall_s": wall, "exit_code": code})
    if not result["ok"]:
        result["error"] = result.get("error") or tail
    shutil.rmtree(scratch / "run", ignore_errors=True)  # model copies can be large
    return result


def run_alternating(
    variants: Sequence[Variant], args: argparse.Namespace, scratch: Path, log: Callable[[str], None] = print
) -> None:
    """Run every variant `args.repeats` times in the order A B C A B C ...; results go to `variant.runs`."""
    gate = Gate.from_args(args)
    env = worker_env(args.threads)
    for repeat in range(args.repeats):
        for variant in variants:
            for attempt in range(gate.retries + 1):
                load, waited = gate.wait_quiet()
                result = run_worker(variant.spec, env, args.timeout, scratch / f"{variant.label}-{repeat}-{attempt}")
                result.update(
                    {"repeat": repeat, "attempt": attempt, "load1_before": round(load, 2), "waited_s": round(waited, 1)}
                )
                result["clean"] = gate.clean(result, load)
                variant.runs.append(result)
                log(run_line(variant.label, result))
                if not result["ok"]:
                    raise BenchmarkError(f"{variant.label} failed:\n{result['error']}")
                if result["clean"]:
                    break


def run_line(label: str, result: dict[str, Any]) -> str:
    speed = result.get("throughput")
    unit = result.get("throughput_unit", "")
    parts = [
        f"[bench] {label:<24} run {result['repeat']}.{result['attempt']}",
        f"loop {result.get('loop_s', float('nan')):7.2f} s",
        f"{fmt(speed, 2):>9} {unit}" if speed is not None else "",
        f"peak {memory_text(result)}",
        f"load1 {result['load1_before']:.2f}->{result.get('load1_after', float('nan')):.2f}",
        f"foreign {100 * result.get('foreign_cpu', 0):4.1f}%",
        "" if result["clean"] else "CONTENDED",
    ]
    return "  ".join(part for part in parts if part)


def memory_text(result: dict[str, Any]) -> str:
    if result.get("peak_cuda_bytes") is not None:
        return f"{result['peak_cuda_bytes'] / GIB:.2f} GiB"
    return f"{result.get('peak_rss_bytes', 0) / MB:.0f} MB"


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


SUMMARY_KEYS = (
    "throughput",
    "step_s",
    "loop_s",
    "loop_cpu_s",
    "import_s",
    "setup_s",
    "post_s",
    "process_wall_s",
    "peak_rss_bytes",
    "rss_loop_start_bytes",
    "peak_cuda_bytes",
    "foreign_cpu",
    "load1_before",
    "load1_after",
)


def summarize(variant: Variant) -> dict[str, Any]:
    """Medians over the clean runs (all runs, flagged, when none was clean)."""
    clean = [run for run in variant.runs if run["clean"]]
    used = clean or [run for run in variant.runs if run["ok"]]
    first = used[0]
    summary = {key: median_of(used, key) for key in SUMMARY_KEYS}
    summary.update(
        {
            "label": variant.label,
            "runs_clean": len(clean),
            "runs_total": len(variant.runs),
            "contended": not clean,
            "throughput_unit": first.get("throughput_unit"),
            "trainable_params": first.get("trainable_params"),
            "total_params": first.get("total_params"),
            "trainable_share": first.get("trainable_share"),
            "train_loss": first.get("train_loss"),
            "steps_timed": first.get("steps_timed"),
            "tokens_per_step": first.get("tokens_per_step"),
        }
    )
    return summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if 0 < abs(value) < 10 ** (1 - digits):  # small rates (PPO episodes/s on CPU) keep 2 significant digits
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def share_text(summary: dict[str, Any]) -> str:
    share = summary.get("trainable_share")
    return "–" if share is None else f"{100 * share:.2f} %"


def memory_cell(summary: dict[str, Any]) -> str:
    if summary.get("peak_cuda_bytes") is not None:
        return f"{summary['peak_cuda_bytes'] / GIB:.2f} GiB"
    if summary.get("peak_rss_bytes") is None:
        return "–"
    return f"{summary['peak_rss_bytes'] / MB:,.0f} MB"


def start(args: argparse.Namespace, name: str) -> tuple[Path, dict[str, Any]]:
    """Every benchmark's opening: the device checked, its scratch folder, and the machine facts it reports."""
    check_device(args.device)
    return scratch_dir(args, name), machine_info(args.threads, args.device)


def scratch_dir(args: argparse.Namespace, name: str) -> Path:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return args.workdir
    return Path(tempfile.mkdtemp(prefix=f"kochat-bench-{name}-"))


def finish(args: argparse.Namespace, scratch: Path, name: str, payload: dict[str, Any], markdown: str) -> Path:
    """Write the JSON (and the Markdown tables next to it), print where, tidy the scratch folder."""
    from kochat_trl.run.outputs import write_json_atomic, write_text_atomic

    out = args.out or RESULTS_DIR / f"{name}.json"
    write_json_atomic(payload, out)
    write_text_atomic(markdown + "\n", out.with_suffix(".md"))
    print(f"\n[bench] wrote {out} and {out.with_suffix('.md')}")
    if args.workdir is None and not args.keep_workdir:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def command_line() -> str:
    return " ".join(["python", *[arg if " " not in arg else repr(arg) for arg in sys.argv]])
