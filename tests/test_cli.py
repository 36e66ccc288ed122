import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captune.cli import main
from captune.trainables.checkpoint import load_checkpoint, read_payload
from captune.trainables.evaluation import evaluate_beams, evaluate_split
from tests import datasets
from tests.conftest import tiny_overrides
from tests.test_images import bomb_png

CAPTUNE = [sys.executable, "-m", "captune.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([*CAPTUNE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_synth_and_check_json(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--images", "40", "--seed", "3"]) == 0
    assert (tmp_path / "d" / "captune.yaml").is_file()
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "d"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "kaggle" and report["images"] == 40 and report["captions"] == 200
    assert sum(report["splits"].values()) == 40 and report["problems"] == []
    # the same seed writes the same bytes
    main(["data", "synth", "--out", str(tmp_path / "e"), "--images", "40", "--seed", "3"])
    for name in ("captions.txt", "Images/synth_3_000007.jpg"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "e" / name).read_bytes()


@pytest.fixture()
def bad_dataset(tmp_path) -> Path:
    caps = datasets.sample_captions(12)
    root = datasets.kaggle(tmp_path / "bad", caps, images=[im for im in caps if im != "img002.jpg"])
    (root / "Images" / "img003.jpg").write_bytes(b"")
    good = (root / "Images" / "img004.jpg").read_bytes()
    (root / "Images" / "img004.jpg").write_bytes(good[: len(good) // 2])
    bomb_png(root / "Images" / "img005.jpg")  # claims 30000 x 30000 pixels: PIL's DecompressionBombError
    with open(root / "captions.txt", "a") as f:
        f.write("img006.jpg,a caption,with,too many fields\n")
    return root


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_bad_items_are_named_without_traceback(bad_dataset):
    check = run_cli("data", "check", str(bad_dataset))
    assert check.returncode == 1
    for needle in ("img002.jpg", "img003.jpg", "empty file", "img004.jpg", "truncated", "captions.txt:38",
                   "malformed_line", "img005.jpg", "too large to decode safely"):
        assert needle in check.stdout, needle
    train = run_cli("train", "--arch", "cnn-lstm", "--data", str(bad_dataset), "--set", "pretrained=false",
                    "--set", "encoder=vgg-small")
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "img002.jpg" in train.stderr and "captions.txt:38" in train.stderr and "--skip-bad" in train.stderr
    assert "img005.jpg" in train.stderr


@pytest.mark.parametrize("args,needle", [
    (["--set", "lr=-1"], "lr=-1.0 must be greater than 0"),
    (["--set", "hidden_size=0"], "hidden_size=0 must be at least 1"),
    (["--set", "colour=red"], "unknown key 'colour'"),
    (["--set", "epochs=two"], "epochs='two' is not a valid int"),
    (["--set", "encoder=resnet50"], "encoder='resnet50' does not fit arch cnn-lstm"),
    (["--set", "lr=inf"], "lr=inf must be a finite number"),  # inf passed `lr > 0`
    (["--set", "weight_decay=inf"], "weight_decay=inf must be a finite number"),
    (["--set", "val_beam=50"], "val_beam=50 must be at most 20"),
    (["--set", "metric=meteor"], "metric='meteor' is not one of bleu4, cider"),
])
def test_bad_settings_are_refused_naming_the_key(synth_dir, args, needle):
    result = run_cli("train", "--arch", "cnn-lstm", "--data", str(synth_dir), *args)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_beam_widths_and_files_that_are_not_models_are_refused_clearly(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    for args in (["evaluate", "m.pt", "--data", str(tmp_path), "--beam", "1000000"],
                 ["caption", "m.pt", str(image), "--beam", "21"], ["caption", "m.pt", str(image), "--beam", "0"]):
        result = run_cli(*args)
        assert result.returncode == 2 and "beam width must be in 1..20" in result.stderr, result.stderr
    (tmp_path / "notes.txt").write_text("epoch 1 loss 2.3\n")  # torch: KeyError: 101
    result = run_cli("caption", str(tmp_path / "notes.txt"), str(image))
    assert result.returncode == 2 and "notes.txt: not a PyTorch checkpoint file" in result.stderr
    assert "KeyError" not in result.stderr and "Traceback" not in result.stderr
    # a pickle of anything but tensors and plain values: refused without torch's advice to unpickle it
    subprocess.run([sys.executable, "-c", "import torch, argparse; torch.save({'x': argparse.Namespace(a=1)}, "
                    f"{str(tmp_path / 'pickled.pt')!r})"], check=True)
    result = run_cli("caption", str(tmp_path / "pickled.pt"), str(image))
    assert result.returncode == 2 and "captune never runs code from a model file" in result.stderr
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr


def test_more_workers_than_the_cluster_holds_are_refused_up_front(ray_cluster, synth_dir, tmp_path, capsys):
    # Ray would wait for the 64 workers' CPUs forever (printing a start-up timeout every minute)
    assert main(["train", "--arch", "cnn-lstm", "--data", str(synth_dir), "--workers", "64",
                 "--out", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err
    assert "--workers 64: 64 worker(s) x 1 CPU need 64 CPUs; the local Ray cluster has 4" in err
    assert not (tmp_path / "m.db").exists()  # refused before any run was recorded


def test_output_and_store_paths_that_cannot_be_written_are_refused_up_front(ray_cluster, synth_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where a folder should go")
    args = ["train", "--arch", "cnn-lstm", "--data", str(synth_dir)]
    assert main([*args, "--out", str(tmp_path / "taken"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert f"--out: {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'taken' / 'm.db'}"]) == 2
    assert f"MLflow store {tmp_path / 'taken' / 'm.db'}: {tmp_path / 'taken'} is a file, not a folder" in \
           capsys.readouterr().err
    (tmp_path / "store").mkdir()
    assert main([*args, "--out", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'store'}"]) == 2
    assert "a folder of that name exists; the store is a file" in capsys.readouterr().err
    assert main(["sweep", "--data", str(synth_dir), "--name", "w", "--storage", str(tmp_path / "taken"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert f"--storage: {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_unknown_layout_and_missing_model(tmp_path):
    result = run_cli("data", "check", str(tmp_path))
    assert result.returncode == 2 and "unknown dataset layout" in result.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    result = run_cli("caption", str(tmp_path / "nope.pt"), str(tmp_path / "x.jpg"))
    assert result.returncode == 2 and "nope.pt: no such checkpoint" in result.stderr


def test_train_evaluate_caption_and_mlflow(ray_cluster, synth_dir, tmp_path, tracking_uri, capsys):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in tiny_overrides("resnet-gru", epochs=2).items() if k != "epochs"]
    assert main(["train", "--arch", "resnet-gru", "--data", str(synth_dir), "--epochs", "2", "--out", str(out),
                 "--tracking-uri", tracking_uri, "--set", "metric=cider", *sets]) == 0
    printed = capsys.readouterr().out
    assert "saved the best epoch by CIDEr-D" in printed and "ROUGE-L" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert set(metrics["final"]) == {"epoch", "bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
    # the epoch kept is the best by the chosen metric (the later one on a tie)
    ciders = [e["cider"] for e in metrics["epochs"]]
    assert metrics["metric"] == "cider" and metrics["best"]["epoch"] == 2 - ciders[::-1].index(max(ciders))
    assert (out / "model.pt").is_file()

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("captune-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == "resnet-gru" and run.data.params["hidden_size"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")] == [1, 2]
    assert run.data.metrics["bleu4"] == pytest.approx(metrics["final"]["bleu4"])
    assert run.data.metrics["best_cider"] == pytest.approx(metrics["best"]["cider"])

    capsys.readouterr()
    assert main(["evaluate", str(out / "model.pt"), "--data", str(synth_dir), "--split", "val", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    # the saved epoch scores on its own as it did in training's validation
    saved = read_payload(out / "model.pt")["epoch"]
    trained = next(e for e in metrics["epochs"] if e["epoch"] == saved)
    assert scores["images"] == 6 and scores["bleu4"] == pytest.approx(trained["bleu4"])
    assert scores["cider"] == pytest.approx(trained["cider"]) and scores["rouge_l"] == pytest.approx(trained["rouge_l"])
    # `compare` scores every beam over one encoding: the same as one beam at a time
    loaded = load_checkpoint(out / "model.pt")
    both = evaluate_beams(loaded, synth_dir, "val", beams=(1, 3))
    assert both[1] == evaluate_split(loaded, synth_dir, "val", beam=1) and both[1]["bleu4"] == scores["bleu4"]
    assert both[3] == evaluate_split(loaded, synth_dir, "val", beam=3)

    photo = tmp_path / "photo.png"
    Image.open(next((synth_dir / "Images").iterdir())).resize((300, 200)).save(photo)
    uri = f"runs:/{run.info.run_id}/model"
    images = [str(photo), str(next((synth_dir / "Images").iterdir()))]
    assert main(["caption", uri, *images, "--tracking-uri", tracking_uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = list(csv.reader(lines))
    assert rows[0] == ["image", "caption"] and [row[0] for row in rows[1:]] == images
    # the MLflow model (saved without the optimizer) captions as the checkpoint it was logged from
    assert main(["caption", str(out / "model.pt"), *images]) == 0
    assert capsys.readouterr().out.splitlines() == lines

    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    predicted = mlflow.pyfunc.load_model(uri, dst_path=str(tmp_path)).predict(pd.DataFrame({"image": [str(photo)]}))
    assert len(predicted) == 1 and isinstance(predicted[0], str)


def test_errors_a_user_causes_are_user_errors_and_the_cli_stays_light():
    # the CLI prints a UserError in one line, without a traceback; each of these is one
    import importlib

    from captune.infra.errors import UserError

    for name in ("captune.trainables.config.ConfigError", "captune.data.layouts.LayoutError", "captune.data.prepare.DataProblems",
                 "captune.trainables.checkpoint.CheckpointError", "captune.data.cache.DiskFullError", "captune.data.images.ImageError",
                 "captune.trainables.encoders.WeightsUnavailable", "captune.training.TrainFailed",
                 "captune.infra.mlflow_store.TrackingUnavailable", "captune.caption_files.OutputFileError"):
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), UserError), name
    # catching them needs none of the heavy libraries
    code = "import sys, captune.cli; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"