"""Where a command's CPU goes, by kind of process: run it (default: the test suite) while every
process's CPU seconds are sampled, then print them per kind (Ray's daemons and workers, MLflow's
servers, captune's CLI processes, pytest, ...), most first.

    python benchmarks/suite_cpu.py                     # make test
    python benchmarks/suite_cpu.py -- pytest -q tests/test_sweep.py

Processes that live less than one sampling interval are missed; a process counts from the first
sample that sees it (what it used before, when it started before the command, is left out).
"""
from __future__ import annotations

import argparse
import subprocess
import time

import psutil

# First match wins: a captune command given `--tracking-uri .../mlflow.db` is captune's, not MLflow's.
KINDS = [("gcs_server", "ray: GCS server"), ("raylet", "ray: raylet"), ("dashboard/agent", "ray: dashboard agent"),
         ("dashboard.py", "ray: dashboard"), ("ray-dashboard", "ray: dashboard"),
         ("runtime_env/agent", "ray: runtime-env agent"),
         ("log_monitor", "ray: log monitor"), ("autoscaler/_private/monitor", "ray: monitor"),
         ("ray::IDLE", "ray: idle worker"), ("ray::trial", "ray: trial actor"), ("ray::", "ray: other worker"),
         ("default_worker.py", "ray: worker starting"), ("fork_stand_in", "captune: fork stand-in"),
         ("captune.infra.forkserver", "captune: fork server"), ("captune.cli", "captune: CLI process"),
         ("pytest", "pytest"), ("models serve", "mlflow: models serve"), ("mlflow server", "mlflow: server"),
         ("uvicorn", "mlflow: uvicorn worker"), ("mlflow", "mlflow: other"), ("chrom", "chromium"),
         ("pip", "pip")]


def kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    return next((name for needle, name in KINDS if needle in text), (cmdline[0].rsplit("/", 1)[-1] if cmdline else "?"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("command", nargs="*", default=["make", "test"])
    args = parser.parse_args()
    before = {(p.pid, p.create_time()) for p in psutil.process_iter()}
    cpu, kinds, first = {}, {}, {}
    proc = subprocess.Popen(args.command)
    start = time.monotonic()
    while True:
        for p in psutil.process_iter(["cmdline", "cpu_times", "create_time"]):
            try:
                key = (p.pid, p.info["create_time"])
                used = p.info["cpu_times"].user + p.info["cpu_times"].system
            except (psutil.Error, AttributeError, TypeError):
                continue
            if key not in kinds:
                kinds[key] = kind(p.info["cmdline"] or [])
                first[key] = used if key in before else 0.0  # (what it used before the command)
            cpu[key] = used
        if proc.poll() is not None:
            break
        time.sleep(args.every)
    wall = time.monotonic() - start
    totals: dict[str, float] = {}
    for key, used in cpu.items():
        totals[kinds[key]] = totals.get(kinds[key], 0.0) + used - first[key]
    total = sum(totals.values())
    print(f"\n{' '.join(args.command)}: exit {proc.returncode}, {wall:.0f} s wall, {total:.0f} CPU-s sampled "
          f"({total / wall:.2f} cores busy on average)")
    for name, used in sorted(totals.items(), key=lambda kv: -kv[1]):
        if used >= 0.5:
            print(f"{used:8.1f} CPU-s  {100 * used / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
