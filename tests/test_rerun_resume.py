"""Reruns stopped part-way (the seed replicates by which `captune sweep --seeds K` chooses its
champion, then its image-blind control; the replicates of `captune compare --seeds K`) go on from
their last epoch, in their own MLflow run, when the command printed at the stop (or the same
compare) is run again (D2, D3, D21). A sweep's replicates and its control are reruns of one kind
(captune.search.reruns), run alike in the search's task: the sweep is stopped in its replicate."""
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from tests.conftest import attached
from tests.test_sweep import sweep_yaml

EPOCHS = 10  # the reruns train as long as the trials: long enough to be stopped in the middle
# Each epoch a fraction of a second, not TINY's 0.1 s: a stop lands in the middle of a rerun, not after it.
SPACE = {"lr": {"loguniform": [0.001, 0.01]}, "image_size": 64, "hidden_size": 128}
NAME = "rr"


def _command(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A captune command in a process group of its own, as a terminal runs it."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "captune.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _ctrl_c_once(proc: subprocess.Popen, log: Path, ready, what: str) -> str:
    """Wait (polling) until `ready()`, then Ctrl-C to the command's group; its output."""
    deadline = time.monotonic() + 150
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"{what}: not reached\n" + log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    asked = time.monotonic()
    code = proc.wait(60)
    print(f"{what}: stopped {time.monotonic() - asked:.1f}s after Ctrl-C")
    text = log.read_text()
    assert code == 130 and "Traceback" not in text, text[-3000:]
    return text


def _finish(argv: list[str], log: Path, env: dict) -> str:
    proc = _command(argv, log, env)
    assert proc.wait(240) == 0, log.read_text()[-3000:]
    return log.read_text()


def test_stopped_replicates_of_a_sweep_and_of_compare_go_on_from_their_last_epoch_in_their_own_run(
        ray_cluster, synth_dir, tmp_path, tracking_uri):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=1, epochs=EPOCHS, space=SPACE)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **attached(ray_cluster)}
    client = MlflowClient(tracking_uri)

    def runs(kind: str, seed: int | None = None) -> list:
        experiment = client.get_experiment_by_name(NAME)
        if experiment is None:
            return []
        query = f"tags.`captune.kind` = '{kind}'" + (f" and tags.`captune.seed` = '{seed}'" if seed is not None else "")
        return client.search_runs([experiment.experiment_id], filter_string=query)

    def epochs(run) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, "bleu4"))

    def stopped_run(kind: str, seed: int | None = None):
        """The one run of the rerun, KILLED by the Ctrl-C; the epochs it logged and the last one
        kept (its latest checkpoint in the sweep's storage: the stop may fall between keeping an
        epoch and logging it, and the resume logs it then)."""
        from captune.trainables.checkpoint import read_payload

        (run,) = runs(kind, seed)
        assert run.info.status == "KILLED" and run.data.tags["captune.stop_reason"] == "SIGINT (Ctrl-C)", run
        logged = epochs(run)
        assert logged == list(range(1, len(logged) + 1)) and len(logged) < EPOCHS, logged
        latest = tmp_path / "tune" / f"{NAME}-reruns" / run.data.tags.get("captune.rerun_key", "?") / "latest"
        kept = read_payload(latest)["epoch"] if latest.exists() else len(logged)  # (none kept: the resume says so)
        print(f"{run.info.run_name}: stopped after epoch {kept} of {EPOCHS} ({len(logged)} logged)")
        assert len(logged) <= kept < EPOCHS
        return run, kept

    def went_on(run, kept: int) -> None:
        """`run` again, FINISHED, gone on from the last epoch it kept: each epoch logged once."""
        (after,) = [r for r in runs(run.data.tags["captune.kind"], int(run.data.tags["captune.seed"]))]
        assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED", after
        assert after.data.tags["captune.resumed_from_epoch"] == str(kept), (after.data.tags, kept)
        assert "captune.stop_reason" not in after.data.tags
        assert epochs(after) == list(range(1, EPOCHS + 1))

    # D2, D3: Ctrl-C while the sweep's replicate trains (its champion chosen over one new seed),
    # then the command it prints, as a user pastes it.
    sweep = ["sweep", "--data", str(synth_dir), "--name", NAME, "--arch", "cnn-lstm", "--config", str(config),
             "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--seeds", "1"]
    t0 = time.monotonic()
    text = _ctrl_c_once(_command(sweep, tmp_path / "sweep.log", env), tmp_path / "sweep.log",
                        lambda: any(len(epochs(r)) >= 2 for r in runs("replicate")), "the sweep's replicate")
    print(f"sweep to the stop: {time.monotonic() - t0:.0f}s")
    (printed,) = [line[line.index("captune sweep"):] for line in text.splitlines() if "To go on" in line]
    assert "--seeds 1" in printed, printed
    replicate, kept = stopped_run("replicate")
    assert not runs("control")  # the control follows the champion the replicates choose
    words = shlex.split(printed)
    assert words[0] == "captune"
    t0 = time.monotonic()
    _finish(words[1:], tmp_path / "resumed.log", env)
    print(f"resumed sweep: {time.monotonic() - t0:.0f}s")
    went_on(replicate, kept)
    (control,) = runs("control")
    assert control.info.status == "FINISHED" and epochs(control) == list(range(1, EPOCHS + 1))
    seed = int(replicate.data.tags["captune.seed"])
    (parent,) = runs("search")
    assert parent.data.tags["captune.seed_choice"].startswith("chosen over 1 new seed each from the top 1: #1")

    # D21: Ctrl-C while `compare --seeds 2` trains its second replicate (the first is the sweep's).
    compare = ["compare", NAME, "--tracking-uri", tracking_uri, "--seeds", "2"]
    t0 = time.monotonic()
    _ctrl_c_once(_command(compare, tmp_path / "compare.log", env), tmp_path / "compare.log",
                 lambda: any(len(epochs(r)) >= 1 for r in runs("replicate", seed + 1)), "the second replicate")
    print(f"compare to the stop: {time.monotonic() - t0:.0f}s")
    second, kept = stopped_run("replicate", seed + 1)
    t0 = time.monotonic()
    _finish(compare, tmp_path / "compared.log", env)
    print(f"compare again: {time.monotonic() - t0:.0f}s")
    went_on(second, kept)
    (first,) = runs("replicate", seed)  # the sweep's, reused, not trained again
    assert first.info.run_id == replicate.info.run_id and epochs(first) == list(range(1, EPOCHS + 1))


def test_an_epoch_kept_but_not_yet_logged_at_the_stop_is_logged_by_the_resume(ray_cluster, synth_dir, tmp_path,
                                                                                tracking_uri):
    # The state a stop leaves when it falls between keeping an epoch's checkpoint and logging its
    # metrics (the relay writes them a moment later; the test above meets it by chance, and met
    # epoch 4 lost so): epoch 3 kept, epochs 1-2 in MLflow. The resume goes on from epoch 3 and
    # logs epoch 3 from the checkpoint's history: each of the 5 epochs in the run once (it had 1,
    # 2, 4, 5).
    from captune.infra.mlflow_logging import metric_entities
    from captune.infra.mlflow_relay import start_relay
    from captune.search.rerun_job import RerunJob
    from captune.search.reruns import run_reruns
    from captune.trainables.reporting import KeptCheckpoints, Reporter, mlflow_epoch
    from tests.conftest import tiny_overrides
    from captune.trainables.checkpoint import read_payload
    from captune.trainables.config import TrainConfig
    from captune.trainables.loop import WorkerContext, train

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("gap")
    parent = client.create_run(experiment_id, run_name="parent").info.run_id
    config = TrainConfig(arch="cnn-lstm", **tiny_overrides("cnn-lstm", epochs=5)).to_dict()
    relay = start_relay(tracking_uri)
    job = RerunJob(kind="replicate", config=config, data_root=str(synth_dir), experiment_id=experiment_id,
                   parent_run_id=parent, sweep="gap", run_name="gap-seed0", storage=str(tmp_path / "tune"),
                   relay=relay, echo_epochs=False)
    kept, reported = KeptCheckpoints(job.checkpoints, tmp_path), []

    reporter = Reporter(kept=kept, sink=lambda metrics, checkpoint_dir: reported.append(metrics["epoch"]))
    train(TrainConfig(**config), str(synth_dir), WorkerContext(reporter=reporter, echo=lambda line: None,
                                                               stop_requested=lambda: len(reported) >= 3))
    history = read_payload(kept.latest())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    run_id = client.create_run(experiment_id, run_name=job.run_name, tags=job.tags()).info.run_id
    for metrics in history[:2]:
        client.log_batch(run_id, metrics=metric_entities(mlflow_epoch(metrics, metrics["epoch"] == 1), metrics["epoch"]))
    client.set_tag(run_id, "captune.stop_reason", "SIGINT (Ctrl-C)")
    client.set_terminated(run_id, "KILLED")
    try:
        [result] = run_reruns(client, [job], concurrent=1, cpus=1)
    finally:
        ray_cluster.kill(relay)
    run = client.get_run(run_id)
    assert result["run_id"] == run_id and run.info.status == "FINISHED"
    assert run.data.tags["captune.resumed_from_epoch"] == "3"
    bleu4 = client.get_metric_history(run_id, "bleu4")
    assert sorted(m.step for m in bleu4) == [1, 2, 3, 4, 5]
    assert {m.step: m.value for m in bleu4}[3] == history[2]["bleu4"]  # epoch 3 as it was trained
