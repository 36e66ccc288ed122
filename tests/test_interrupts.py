"""Stopping commands (Ctrl-C, SIGTERM), tracking stores that fail mid-run, disks that fill up:
nothing finished is lost, and the command says how to go on. Real processes, signals sent to the
process group as a terminal or a job scheduler sends them, real (small) file systems."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from captune.cli import main
from captune.trainables.checkpoint import read_payload
from mlflow import MlflowClient
from tests.conftest import attached, tiny_overrides
from tests.test_sweep import sweep_yaml

CAPTUNE = [sys.executable, "-m", "captune.cli"]


class Output:
    """A command's output lines as they come (in a thread), so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self._thread.start()

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in time:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.1)

    def text(self) -> str:
        self._thread.join(30)
        return "".join(self.lines)


def start(args: list[str], **env) -> tuple[subprocess.Popen, Output]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env}, start_new_session=True)
    return proc, Output(proc)


def lock_sqlite(path) -> subprocess.Popen:
    """Another process holding the SQLite store locked (as a long write does) until killed."""
    code = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(600)")
    locker = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    return locker


def test_ctrl_c_in_train_keeps_every_finished_epoch_with_the_store_locked(ray_cluster, synth_dir, tmp_path, new_store):
    # Training goes on while another process holds the SQLite store locked (from epoch 2); Ctrl-C
    # at epoch 4 stops it at the next step. The finished epochs are kept in --out, the MLflow
    # record is left to `captune record`, and `--resume` goes on from the last epoch.
    db = tmp_path / "mlflow.db"
    uri, out = new_store(db), tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in tiny_overrides("cnn-lstm").items() if k != "epochs"]
    proc, output = start([*CAPTUNE, "train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--epochs", "500",
                          "--out", str(out), "--tracking-uri", uri, *sets], **attached(ray_cluster))
    output.wait_for("epoch 2/500")
    locker = lock_sqlite(db)
    try:
        output.wait_for("epoch 4/500")
        asked = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130
        print(f"stopped {time.monotonic() - asked:.1f}s after Ctrl-C")
        text = output.text()
        assert "Traceback" not in text, text[text.index("Traceback") - 200:][:4000]
        assert "stopping at the next training step" in text and "stopped (SIGINT (Ctrl-C))" in text
        assert f"captune record {out}" in text and f"captune train --resume {out}" in text
        metrics = json.loads((out / "metrics.json").read_text())
        finished = [e["epoch"] for e in metrics["epochs"]]
        assert finished == list(range(1, len(finished) + 1)) and len(finished) >= 4
        assert read_payload(out / "model.pt")["epoch"] == metrics["best"]["epoch"]
    finally:
        locker.kill()

    assert main(["record", str(out)]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("captune-train").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["captune.stop_reason"] == "SIGINT (Ctrl-C)"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")] == finished  # each once
    assert run.data.tags["captune.model_epoch"] == str(metrics["best"]["epoch"])
    assert main(["record", str(out)]) == 0  # again: nothing written twice
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")] == finished

    # --resume keeps the folder's settings; another setting is refused, more epochs are not
    assert main(["train", "--resume", str(out), "--set", "lr=0.1"]) == 2
    total = len(finished) + 2
    assert main(["train", "--resume", str(out), "--epochs", str(total), "--tracking-uri", uri]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, total + 1))
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "captune.stop_reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")] == list(range(1, total + 1))
    # the same --out without --resume is refused, naming what it holds
    assert main(["train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--out", str(out)]) == 2


@contextmanager
def small_disk(folder: Path, size: int):
    """A file system of `size` bytes at `folder` (a tmpfs; mounting needs root, else the test is skipped)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_named_and_loses_no_finished_epoch(ray_cluster, synth_dir, tmp_path, tracking_uri, capsys):
    sets = [f"--set={k}={v}" for k, v in tiny_overrides("cnn-lstm", fine_tune=False).items() if k != "epochs"]
    train = ["train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--tracking-uri", tracking_uri, *sets]
    # Too small for the checkpoints training keeps: refused before it starts, naming the folder.
    with small_disk(tmp_path / "tiny", 64 << 10) as disk:
        assert main([*train, "--out", str(disk / "run")]) == 2
        err = capsys.readouterr().err
        assert "not enough free space" in err and str(disk / "run") in err and "kept checkpoints" in err
        # the decoded images' cache does not fit either: named, with where to put it instead
        assert main([*train, "--out", str(tmp_path / "run"), "--set", f"cache_dir={disk / 'cache'}"]) == 2
        err = capsys.readouterr().err
        assert f"no space left in the cache folder {disk / 'cache'}" in err and "CAPTUNE_CACHE_DIR" in err
        config = sweep_yaml(tmp_path / "sweep.yaml", trials=3, epochs=2)
        assert main(["sweep", "--data", str(synth_dir), "--name", "full", "--arch", "cnn-lstm", "--config", str(config),
                     "--storage", str(disk / "tune"), "--tracking-uri", tracking_uri]) == 2
        err = capsys.readouterr().err
        assert "not enough free space" in err and str(disk / "tune") in err and "3 trials" in err

    # Room enough at the start, then filled by something else after epoch 2: the next checkpoint
    # cannot be written. The command names the full disk in one line and keeps the epochs before.
    with small_disk(tmp_path / "small", 64 << 20) as disk:
        out = disk / "run"
        filler = disk / "filler"

        def fill_after_epoch_2() -> None:  # (once epoch 3 is being written) as another program would
            deadline = time.monotonic() + 180
            while len(list((out / "ray" / "run").glob("checkpoint_*"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(filler, "wb") as f:  # everything that is left
                try:
                    while True:
                        f.write(b"\0" * (64 << 10))
                except OSError:
                    pass

        threading.Thread(target=fill_after_epoch_2, daemon=True).start()
        assert main([*train, "--epochs", "500", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert "Traceback" not in text, text[text.index("Traceback") - 200:][:4000]
        assert "no space left on" in captured.err and str(out) in captured.err, text[-3000:]
        assert f"captune train --resume {out}" in captured.err
        filler.unlink()
        kept = set()
        for folder in (out / "ray" / "run").glob("checkpoint_*"):
            try:
                kept.add(int(read_payload(folder / "model.pt")["epoch"]))
            except Exception:  # the one being written when the disk filled up
                pass
        # The finished epochs' checkpoints are there for --resume: training keeps two (the best by score,
        # Ray keeping the latest too), so which two depends on whether the disk filled during epoch 3 or 4.
        assert len(kept) >= 2 and max(kept) >= 2, kept


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_store_locked_at_start_is_refused_before_anything_starts(synth_dir, tmp_path):
    # Another process holds the SQLite store locked: `train` and `sweep` each wait SQLite's 20 s,
    # then refuse in one paragraph naming the store, before Ray, data or any run.
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # the store exists (its tables made), then is locked
    locker = lock_sqlite(db)
    try:
        train = start([*CAPTUNE, "train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--out", str(tmp_path / "run"),
                       "--tracking-uri", uri])
        sweep = start([*CAPTUNE, "sweep", "--data", str(synth_dir), "--name", "locked", "--storage",
                       str(tmp_path / "tune"), "--tracking-uri", uri])
        for proc, output in (train, sweep):
            assert proc.wait(120) == 2
            text = output.text()
            assert f"MLflow store {uri} did not answer" in text and "database is locked" in text, text[-2000:]
            assert "nothing was started" in text and "Traceback" not in text
    finally:
        locker.kill()
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "tune").exists()
