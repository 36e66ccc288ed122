"""How fast captune's commands stop on the first Ctrl-C or SIGTERM, and what they lose.

    python benchmarks/stops.py [--data datasets/synth] [--work /tmp/captune-stops]

Each command is started as a user starts it (a process group of its own, as a terminal gives it),
stopped at a set point by SIGINT to the group (Ctrl-C) or SIGTERM to the process (a job
scheduler), then resumed to its end. Printed per case: seconds from the signal to the command's
exit, its exit code, whether a traceback was printed, MLflow runs left RUNNING, and the epochs
lost: finished (reported) before the stop but missing after it, in `metrics.json` or MLflow.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow import MlflowClient

CAPTUNE = [sys.executable, "-m", "captune.cli"]


class Command:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{text!r} never came:\n" + "".join(self.lines)[-3000:])
            time.sleep(0.05)

    def stop(self, how: str) -> tuple[float, int]:
        asked = time.monotonic()
        if how == "SIGINT":
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(300)
        seconds = time.monotonic() - asked
        self.reader.join(30)
        self.log.write_text("".join(self.lines))
        return seconds, code

    def text(self) -> str:
        return "".join(self.lines)


def epochs_printed(text: str) -> list[int]:
    return [int(line.split("epoch ", 1)[1].split("/", 1)[0]) for line in text.splitlines()
            if "epoch " in line and "/" in line.split("epoch ", 1)[1][:6] and "loss" in line]


def train_case(args, work: Path, how: str, uri: str) -> dict:
    out = work / f"train-{how}"
    cmd = Command([*CAPTUNE, "train", "--arch", "cnn-lstm", "--data", args.data, "--epochs", "8", "--out", str(out),
                   "--tracking-uri", uri], work / f"train-{how}.log")
    cmd.wait_for("epoch 2/8")
    time.sleep(1.0)  # into epoch 3
    seconds, code = cmd.stop(how)
    reported = set(epochs_printed(cmd.text()))
    kept = {e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]}
    state = json.loads((out / "run.json").read_text())
    client = MlflowClient(uri)
    logged = [m.step for m in client.get_metric_history(state["run_id"], "bleu4")]
    status = client.get_run(state["run_id"]).info.status
    resumed = subprocess.run([*CAPTUNE, "train", "--resume", str(out)], capture_output=True, text=True)
    final = [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]]
    final_logged = [m.step for m in client.get_metric_history(state["run_id"], "bleu4")]
    return {"case": f"train, {how} in epoch 3", "seconds": seconds, "exit": code,
            "traceback": "Traceback" in cmd.text(), "running_left": int(status == "RUNNING"),
            "epochs_lost": len(reported - kept) + len(reported - set(logged)),
            "after_resume": f"rc {resumed.returncode}, epochs {final == list(range(1, 9))}, "
                            f"MLflow steps once each {final_logged == list(range(1, 9))}"}


def sweep_case(args, work: Path, how: str, uri: str, point: str) -> dict:
    name = f"stops-{how.lower()}"
    base = [*CAPTUNE, "sweep", "--data", args.data, "--name", name, "--config", "search/demo.yaml", "--trials", "3",
            "--storage", str(work / "tune"), "--tracking-uri", uri, "--no-control"]
    cmd = Command(base, work / f"{name}.log")
    cmd.wait_for(point)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name).experiment_id

    def epochs() -> dict[str, list[int]]:
        runs = client.search_runs([experiment], filter_string="tags.`captune.kind` = 'trial'")
        return {r.data.tags["captune.trial_id"]: [m.step for m in client.get_metric_history(r.info.run_id, "bleu4")]
                for r in runs}

    before = epochs()
    seconds, code = cmd.stop(how)
    after = epochs()
    running = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    resumed = subprocess.run([*base, "--resume"], capture_output=True, text=True)
    final = epochs()
    lost = sum(len(set(steps) - set(after.get(trial, []))) for trial, steps in before.items())
    once = all(steps == list(range(1, len(steps) + 1)) for steps in final.values())
    return {"case": f"sweep, {how} {point!r}", "seconds": seconds, "exit": code, "traceback": "Traceback" in cmd.text(),
            "running_left": len(running), "epochs_lost": lost,
            "after_resume": f"rc {resumed.returncode}, {len(final)} trial runs, each epoch once {once}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/synth")
    parser.add_argument("--work", default="/tmp/captune-stops")
    args = parser.parse_args()
    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rows = [train_case(args, work, "SIGINT", uri), train_case(args, work, "SIGTERM", uri),
            sweep_case(args, work, "SIGINT", uri, "epoch 1/6"), sweep_case(args, work, "SIGTERM", uri, "epoch 4/6")]
    print(f"{'case':42s} {'stop s':>6s} {'exit':>4s} {'traceback':>9s} {'RUNNING':>7s} {'lost':>4s}  after --resume")
    for r in rows:
        print(f"{r['case']:42s} {r['seconds']:6.1f} {r['exit']:4d} {str(r['traceback']):>9s} {r['running_left']:7d} "
              f"{r['epochs_lost']:4d}  {r['after_resume']}")
    within = sum(r["seconds"] <= 10 for r in rows)
    print(f"stopped within 10 s: {within} of {len(rows)}; epochs lost: {sum(r['epochs_lost'] for r in rows)}; "
          f"runs left RUNNING: {sum(r['running_left'] for r in rows)}")


if __name__ == "__main__":
    main()
