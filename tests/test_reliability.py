"""Faults survived with real processes: a killed trial process, an MLflow server that goes away
for half a minute, a trial that runs out of memory, a feature cache killed half-written; and bad
input refused naming what is wrong. docs/RELIABILITY.md lists each case with its test."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from captune.cli import main
from captune.data.cache import cached_array
from captune.data.layouts import load_corpus
from mlflow import MlflowClient
from tests import datasets
from tests.test_sweep import sweep_yaml, trial_runs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}


def sweep_args(synth_dir, tmp_path, name, config, tracking_uri) -> list[str]:
    return ["sweep", "--data", str(synth_dir), "--name", name, "--arch", "resnet-gru", "--config", str(config),
            "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]


def sweep_in_background(args: list[str]) -> Future:
    """`captune sweep` in a thread of this process, on the session's Ray cluster: the test acts on
    the sweep's trial processes and services while it runs (and saves a Ray start)."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(main, args)
    pool.shutdown(wait=False)
    return future


def wait_for(condition, seconds: float, what: str, log: Path | None = None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}" + (": " + log.read_text()[-3000:] if log else ""))


def epochs_logged(client, name) -> dict[str, list[int]]:
    if client.get_experiment_by_name(name) is None:
        return {}
    return {r.data.tags["captune.trial_id"]: [m.step for m in client.get_metric_history(r.info.run_id, "bleu4")]
            for r in trial_runs(client, name)}


def trial_processes() -> list[psutil.Process]:
    """The Tune actors running trials (Ray titles them after the trainable's class)."""
    return [p for p in psutil.process_iter(["cmdline"]) if "ImplicitFunc" in " ".join(p.info["cmdline"] or [])]


def test_killed_trial_process_resumes_from_its_checkpoint(ray_cluster, synth_dir, tmp_path, tracking_uri):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=5, max_concurrent=1, grace_period=5)
    sweep = sweep_in_background(sweep_args(synth_dir, tmp_path, "k1", config, tracking_uri))
    client = MlflowClient(tracking_uri)
    # kill the trial's process once it has reported two epochs
    wait_for(lambda: any(len(s) >= 2 for s in epochs_logged(client, "k1").values()) or sweep.done(), 240,
             "two epochs")
    assert not sweep.done(), f"the sweep ended before the kill: {sweep.result()}"
    victims = trial_processes()
    assert victims, "no trial process found"
    for p in victims:
        p.send_signal(signal.SIGKILL)
    assert sweep.result(timeout=600) == 0
    runs = trial_runs(client, "k1")
    assert len(runs) == 2 and all(r.data.tags["captune.end_state"] == "finished" for r in runs)
    # every epoch logged once, in order: the restarted trial went on from its last checkpoint
    assert all(steps == [1, 2, 3, 4, 5] for steps in epochs_logged(client, "k1").values())
    assert sum(int(r.data.tags.get("captune.restarts", 0)) for r in runs) >= 1


@pytest.fixture()
def mlflow_server(tmp_path, new_store):
    """A real `mlflow server` (mlflow/server.sh) on a free port, restartable on the same store."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "PORT": str(port), "BACKEND_URI": new_store(tmp_path / "server.db"),
           "ARTIFACTS": str(tmp_path / "server-artifacts"), "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow"))}

    class Server:
        uri = f"http://127.0.0.1:{port}"
        process = None

        def start(self):
            self.process = subprocess.Popen(["bash", str(ROOT / "mlflow" / "server.sh")], env=env,
                                            stdout=open(tmp_path / "server.log", "a"), stderr=subprocess.STDOUT,
                                            start_new_session=True)
            import urllib.request

            def up():
                try:
                    return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
                except OSError:
                    return False
            wait_for(up, 90, "the MLflow server to start", tmp_path / "server.log")

        def stop(self):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    server = Server()
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


def test_mlflow_outage_during_a_sweep_loses_nothing(ray_cluster, mlflow_server, synth_dir, tmp_path, capfd):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=4, max_concurrent=1, grace_period=4)
    sweep = sweep_in_background(sweep_args(synth_dir, tmp_path, "o1", config, mlflow_server.uri))
    client = MlflowClient(mlflow_server.uri)
    wait_for(lambda: any(epochs_logged(client, "o1").values()) or sweep.done(), 240, "a first epoch in MLflow")
    mlflow_server.stop()
    printed = []

    def held() -> bool:  # an epoch ended while the server was away: its record is held, training goes on
        printed.append("".join(capfd.readouterr()))
        return "unreachable" in "".join(printed) or sweep.done()

    wait_for(held, 240, "an epoch while MLflow is away")
    assert not sweep.done(), f"the sweep stopped while MLflow was away: {sweep.result()}"
    mlflow_server.start()
    assert sweep.result(timeout=600) == 0
    said = "".join(printed) + "".join(capfd.readouterr())
    assert "MLflow" in said and "unreachable" in said
    runs = trial_runs(client, "o1")
    assert len(runs) == 2 and all(r.data.tags["captune.end_state"] == "finished" for r in runs), said[-6000:]
    assert all(steps == [1, 2, 3, 4] for steps in epochs_logged(client, "o1").values())
    assert client.get_model_version_by_alias("captune-resnet-gru", "champion")


def test_out_of_memory_trial_is_recorded_and_others_go_on(ray_cluster, synth_dir, tmp_path, tracking_uri,
                                                          monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-0123456789")  # must not reach MLflow
    # embed_size 2**30 asks for a 128 GB embedding table: the allocation fails inside the trial
    space = {"embed_size": {"choice": [128, 1073741824]}}
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=3, epochs=1, space=space, max_concurrent=1, seed=1,
                        max_failures=0)
    assert main(["sweep", "--data", str(synth_dir), "--name", "m1", "--arch", "cnn-lstm", "--config", str(config),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--no-control"]) == 0
    runs = trial_runs(MlflowClient(tracking_uri), "m1")
    states = {(r.data.params["embed_size"], r.data.tags["captune.end_state"]) for r in runs}
    assert ("128", "finished") in states and ("1073741824", "failed") in states
    failed = [r for r in runs if r.data.tags["captune.end_state"] == "failed"]
    assert all("allocate" in r.data.tags["captune.error"] and r.info.status == "FAILED" for r in failed)
    for run in runs:  # no credential from the environment in params or tags
        assert "not-a-real-secret" not in json.dumps([run.data.params, run.data.tags])


KILLED_BUILD = """
import sys, time
from pathlib import Path
import numpy as np
from captune.data.cache import cached_array

def build(out):
    out[: len(out) // 2] = 7.0
    out.flush()
    print("half", flush=True)
    time.sleep(60)  # killed here
    return {}

cached_array(Path(sys.argv[1]), "features-test", {"k": 1}, (1000, 64), "float32", build)
"""


def test_feature_cache_killed_half_written_is_rebuilt(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    assert child.stdout.readline().strip() == "half"
    child.kill()
    child.wait()
    calls = []

    def build(out):
        calls.append(1)
        out[:] = 1.0
        return {"n": len(out)}

    array, info = cached_array(tmp_path, "features-test", {"k": 1}, (1000, 64), "float32", build)
    assert calls == [1] and float(array.min()) == 1.0 and info == {"n": 1000}
    assert not list(tmp_path.glob("*.partial-*"))  # the dead process's half file is cleaned up
    # a later corruption (truncated file, garbage sidecar) is detected too, and rebuilt
    npy = next(tmp_path.glob("features-test-*.npy"))
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)
    cached_array(tmp_path, "features-test", {"k": 1}, (1000, 64), "float32", build)
    npy.with_suffix(".json").write_text("{not json")
    again, _ = cached_array(tmp_path, "features-test", {"k": 1}, (1000, 64), "float32", build)
    assert calls == [1, 1, 1] and np.array_equal(np.asarray(again), np.ones((1000, 64), np.float32))


def test_bad_inputs_are_named(tmp_path):
    caps = datasets.sample_captions(12)
    root = datasets.kaggle(tmp_path / "k", caps)
    with open(root / "captions.txt", "ab") as f:
        f.write(b"../../etc/passwd,a dog escapes\n")
        f.write(b"/etc/hostname,an absolute dog\n")
        f.write(b"img001.jpg,a caf\xe9 dog\n")  # Latin-1, not UTF-8
        f.write(b"img002.jpg," + b" ".join([b"dog"] * 3000) + b"\n")
    corpus = load_corpus(root)
    found = {(p.kind, p.line) for p in corpus.problems}
    assert ("bad_image_name", 38) in found and ("bad_image_name", 39) in found
    assert any(p.kind == "encoding" and p.line == 40 for p in corpus.problems)
    long = next(p for p in corpus.problems if p.kind == "long_caption")
    assert long.line == 41 and "3000 words" in long.detail and long.severity == "error"


def test_duplicate_listing_and_skip_bad_counts(ray_cluster, tmp_path, capsys, tracking_uri):
    # an image listed in two split files is named; --skip-bad trains without it and says so
    caps = datasets.sample_captions(20)
    names = list(caps)
    root = datasets.original(tmp_path / "o", caps, {"train": names[:16], "val": names[16:18] + [names[0]],
                                                    "test": names[18:]})
    corpus = load_corpus(root)
    dup = next(p for p in corpus.problems if p.kind == "duplicate_entry")
    assert dup.line == 3 and "img000.jpg" in dup.detail and "Flickr_8k.devImages.txt" in dup.file
    (root / "Flicker8k_Dataset" / "img005.jpg").write_text("not an image")
    sets = ["pretrained=false", "encoder=vgg-small", "image_size=32", "hidden_size=16", "embed_size=16",
            "vocab_threshold=1"]
    assert main(["train", "--arch", "cnn-lstm", "--data", str(root), "--skip-bad", "--epochs", "1",
                 *(f"--set={s}" for s in sets), "--out", str(tmp_path / "run"),
                 "--tracking-uri", tracking_uri]) == 0
    said = capsys.readouterr().out
    assert "--skip-bad: left out 2 bad item(s)" in said and "img005.jpg" in said and "duplicate_entry" in said


@pytest.mark.parametrize("space,setting,needle", [
    ({"vocab_threshold": {"int": [1, 100000]}}, [], "vocab_threshold=100000 leaves no words"),
    (None, ["--set", "colour=red"], "unknown key 'colour'"),
    (None, ["--set", "grad_clip=-1"], "grad_clip=-1.0 must be greater than 0"),
    ({"lr": {"loguniform": [1.0e-4, float("inf")]}}, [], "loguniform needs finite numbers low < high"),
    ({"lr": 0.002}, [], "nothing to search: no key has a range or choices"),  # Ray: "no search space"
    (None, ["--set", "lr=0.001"], "--set lr: "),  # the drawn lr would silently win
    ({"hidden_size": {"choice": [32, 0]}}, [], "hidden_size value 0 is invalid"),
    (None, ["--set", "metric=cider"], "--set: metric is the sweep's objective, the same for every trial: choose it "
                                      "with --metric"),
])
def test_sweep_settings_are_refused_before_any_trial(ray_cluster, synth_dir, tmp_path, capsys, space, setting,
                                                    needle):
    config = sweep_yaml(tmp_path / "s.yaml", 2, 1, space=space)
    assert main(["sweep", "--data", str(synth_dir), "--name", "bad", "--config", str(config), "--storage",
                 str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *setting]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()  # refused before Tune started anything


def test_a_sweep_file_s_metric_is_checked(synth_dir, tmp_path, capsys):
    from captune.search.request import SweepRequest, plan

    config = sweep_yaml(tmp_path / "s.yaml", 2, 1, metric="rouge_l")
    assert main(["sweep", "--data", str(tmp_path), "--name", "m", "--config", str(config)]) == 2
    assert f"{config} [sweep]: metric='rouge_l' must be one of bleu4, cider" in capsys.readouterr().err
    settings, searches = plan(SweepRequest("m", str(synth_dir), config_file=str(sweep_yaml(tmp_path / "c.yaml", 2, 1,
                                                                                             metric="cider"))))
    assert settings.metric == "cider" and all(s.base.metric == "cider" for s in searches)  # every trial's too
    config = sweep_yaml(tmp_path / "p.yaml", 2, 1, sampler="cmaes")
    assert main(["sweep", "--data", str(tmp_path), "--name", "m", "--config", str(config)]) == 2
    assert f"{config} [sweep]: sampler='cmaes' must be one of tpe, gp, random" in capsys.readouterr().err
    config = sweep_yaml(tmp_path / "e.yaml", 2, 1, early_stopping="hyperband")
    assert main(["sweep", "--data", str(tmp_path), "--name", "m", "--config", str(config)]) == 2
    assert f"{config} [sweep]: early_stopping='hyperband' must be one of none, asha" in capsys.readouterr().err
    config = sweep_yaml(tmp_path / "q.yaml", 2, 1, sampler_args={"n_startup": 3})
    assert main(["sweep", "--data", str(tmp_path), "--name", "m", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config} [sweep]: sampler_args: tpe takes no argument 'n_startup' (the seed is the sweep's); it " \
           f"takes consider_prior" in err and "n_startup_trials" in err
    config = sweep_yaml(tmp_path / "g.yaml", 2, 1, sampler="gp")  # gp's own default arguments, not TPE's
    settings, _ = plan(SweepRequest("m", str(synth_dir), config_file=str(config)))
    assert settings.sampler == "gp" and settings.sampler_args == {}
    settings, _ = plan(SweepRequest("m", str(synth_dir), metric="bleu4", config_file=str(tmp_path / "c.yaml")))
    assert settings.metric == "bleu4"  # --metric wins over the file


def test_gpus_requested_where_there_are_none(ray_cluster, synth_dir, tmp_path, capsys):
    assert main(["sweep", "--data", str(synth_dir), "--name", "g", "--config", str(sweep_yaml(tmp_path / "s.yaml", 2, 1)),
                 "--storage", str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 "--gpus-per-worker", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "--gpus-per-worker 0.25" in err and "no GPU" in err


def test_no_credentials_or_unpickling_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    import re

    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*=|-----BEGIN [A-Z ]*PRIVATE KEY-----")
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".yaml", ".yml", ".sh", ".md", ".toml", ".txt", ".cfg", ".json") or name == "Makefile":
            text = path.read_text(errors="replace")
            assert not secret.search(text), name
            if path.suffix == ".py" and name != "tests/test_reliability.py":
                assert "pickle.load" not in text, name


def test_batched_jpeg_decoding_falls_back_to_pil_for_bad_files(tmp_path):
    # The GPU decoding path (torchvision's decode_jpeg, run here on the CPU): close to PIL's
    # pixels, and a batch holding a bad file goes to PIL, which names it.
    from captune.data.images import decode_jpegs, read_image, read_images
    from captune.data.synth import write_synthetic

    paths = sorted((write_synthetic(tmp_path / "s", images=20) / "Images").iterdir())
    paths[3].write_text("not an image")
    out = np.zeros((20, 3, 32, 32), np.uint8)
    seen = {}  # what a feature hook gets: each decoded image once, the pixels stored in `out`
    left = decode_jpegs(paths, 32, out, "cpu", batch=8,
                        on_batch=lambda rows, pixels: seen.update(zip(rows.tolist(), pixels.numpy())))
    assert left == list(range(8))
    assert sorted(seen) == list(range(8, 20)) and all((seen[i] == out[i]).all() for i in seen)
    pil = np.stack([read_image(p, 32) for p in paths[8:]])
    assert np.abs(out[8:].astype(int) - pil.astype(int)).mean() < 3
    _, errors = read_images(paths, 32, decoder="pil")
    assert list(errors) == [3] and "not an image" in errors[3]


def test_a_trial_tune_fails_before_it_starts_is_recorded_in_mlflow(ray_cluster, tmp_path, tracking_uri, monkeypatch):
    # Tune ends a trial in error without calling any callback when it cannot reuse an actor for it
    # (seen when a trial's thread outlived it by 2 s): the sweep's record of trials still has it.
    from ray.train._internal.storage import StorageContext  # how Tune gives a trial its folder (Ray 2.60)
    from ray.tune.experiment import Trial

    from captune.search.mlflow_trials import MlflowTrials

    monkeypatch.setenv("CAPTUNE_MLFLOW_WAIT_S", "5")
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("e1")
    parent = client.create_run(experiment).info.run_id
    trial = Trial("trial_cnn_lstm", config={"lr": 0.01}, trial_id="t0001", stub=True,
                  storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="e1"))
    trial.init_local_path()
    trial.handle_error(RuntimeError("Trainable runner reuse requires reset_config() to be implemented"))
    trial.set_status(Trial.ERROR)
    MlflowTrials(tracking_uri, experiment, parent, "e1", "cnn-lstm", {"epochs": 1}, 2).on_experiment_end([trial])
    (run,) = client.search_runs([experiment], filter_string="tags.`captune.trial_id` = 't0001'")
    assert run.info.status == "FAILED" and run.data.tags["captune.end_state"] == "failed"
    assert "reset_config" in run.data.tags["captune.error"] and run.data.params["lr"] == "0.01"


def test_a_record_the_store_refuses_fails_the_search_instead_of_waiting_forever(ray_cluster, tmp_path, tracking_uri):
    # Only an outage is waited out (test_mlflow_outage_during_a_sweep_loses_nothing); a refusal is
    # a bug or a bad request, and retrying it every 5 s for the rest of the sweep would hide it.
    from mlflow.exceptions import MlflowException
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from captune.search.mlflow_trials import MlflowTrials

    client = MlflowClient(tracking_uri)
    parent = client.create_run(client.create_experiment("e2")).info.run_id
    trial = Trial("trial_cnn_lstm", config={"lr": 0.01}, trial_id="t0002", stub=True,
                  storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="e2"))
    records = MlflowTrials(tracking_uri, "424242", parent, "e2", "cnn-lstm", {"epochs": 1}, 2)  # no such experiment
    with pytest.raises(MlflowException, match="424242"):
        records.on_trial_start(0, [trial], trial)
