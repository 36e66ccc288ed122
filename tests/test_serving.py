"""The champion in use: served by the real `mlflow models serve`, and `captune caption` on folders."""
import base64
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from captune.caption_files import CaptionFile, OutputFileError, find_images
from captune.cli import main
from captune.data.vocab import Vocabulary
from captune.trainables.checkpoint import save_checkpoint
from captune.serving.inputs import MAX_IMAGE_BYTES, RequestError, checked_params, request_pixels
from captune.trainables.decoding import Decoding
from tests.test_models import tiny

BIN = Path(sys.executable).parent  # `mlflow models serve` runs `uvicorn` from PATH


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def jpeg_and_png(synth_dir: Path, folder: Path) -> list[Path]:
    jpeg = sorted((synth_dir / "Images").iterdir())[0]
    png = folder / "photo.png"
    Image.open(sorted((synth_dir / "Images").iterdir())[1]).resize((300, 200)).save(png)
    return [jpeg, png]


# --- what a request may hold ---------------------------------------------------------------------

def test_each_fault_of_a_request_is_refused_naming_its_row_or_param(synth_dir, tmp_path):
    jpeg, png = jpeg_and_png(synth_dir, tmp_path)
    good = b64(jpeg)
    assert request_pixels([good, b64(png)], 32, allow_paths=False).shape == (2, 3, 32, 32)
    # a browser's data URL and a shell's wrapped base64 are the same image
    wrapped = "\n".join(good[i:i + 76] for i in range(0, len(good), 76))
    same = request_pixels([f"data:image/jpeg;base64,{good}", wrapped], 32, allow_paths=False)
    assert (same[0] == same[1]).all() and (same[0] == request_pixels([good], 32, False)[0]).all()

    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 7000)).save(huge)  # 56 megapixels in a few kB
    faults = {
        "row 1: `image` is not base64-encoded image content": [good, "not base64!"],
        "row 0: not an image PIL can read": [base64.b64encode(b"plain text, not an image").decode()],
        "row 0: corrupt or truncated image": [good[:len(good) // 2 // 4 * 4]],
        "empty input": [],
        "row 0: image of 14.0 MB, over the 10 MB limit": ["A" * int(14 * 2**20 * 4 / 3)],
        "row 0: 8000x7000 pixels, over the 50-megapixel limit": [b64(huge)],
        "row 2: `image` must be a base64 string, got int": [good, good, 7],
        "300 rows: at most 256 images per request": [good] * 300,
    }
    for message, values in faults.items():
        with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(".", r"\.")):
            request_pixels(values, 32, allow_paths=False)
    assert MAX_IMAGE_BYTES == 10 * 2**20
    # a file path is read in-process only, never by a served model
    assert request_pixels([str(jpeg)], 32, allow_paths=True).shape == (1, 3, 32, 32)
    with pytest.raises(RequestError, match="row 0: `image` is not base64"):
        request_pixels([str(jpeg)], 32, allow_paths=False)

    plain, tuned = Decoding(beam=3), Decoding(beam=5, alpha=1.0)  # a model's stored decoding, or the plain one
    assert checked_params(None, plain, 30) == Decoding(3, 0.0, 30)
    assert checked_params({"beam": 3, "max_len": 12}, plain, 30) == Decoding(3, 0.0, 12)
    assert checked_params(None, tuned, 30) == Decoding(5, 1.0, 30)  # what the request leaves out is the model's
    assert checked_params({"beam": 1, "alpha": 0}, tuned, 30) == Decoding(1, 0.0, 30)  # what it says wins
    for params, message in (({"beem": 3}, "unknown param\\(s\\) beem"), ({"beam": 0}, "beam: must be in 1..20, got 0"),
                            ({"beam": 21}, "beam: must be in 1..20"), ({"max_len": 101}, "max_len: must be in 1..100"),
                            ({"beam": "3"}, "beam: must be an integer"), ({"alpha": -0.5}, "alpha: the length penalty"),
                            ({"alpha": "1"}, "must be a number in 0..2")):
        with pytest.raises(RequestError, match=message):
            checked_params(params, plain, 30)


# --- served over HTTP ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextmanager
def serving(model_uri: str, tracking_uri: str, folder: Path):
    """`mlflow models serve` of a registered model, as the README starts it; yields its port."""
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}
    log = (folder / "serve.log").open("w")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (folder / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.fixture()
def served_champion(finished_sweep, tmp_path):
    with serving("models:/captune-resnet-gru@champion", finished_sweep.tracking_uri, tmp_path) as port:
        yield port


def test_served_champion_captions_base64_images_as_the_cli_does_and_refuses_bad_requests(
        served_champion, finished_sweep, synth_dir, tmp_path, capsys):
    port, uri = served_champion, finished_sweep.tracking_uri
    jpeg, png = jpeg_and_png(synth_dir, tmp_path)
    images = [b64(jpeg), b64(png)]
    for beam in (1, 3):
        assert main(["caption", "models:/captune-resnet-gru@champion", str(jpeg), str(png), "--beam", str(beam),
                     "--tracking-uri", uri]) == 0
        expected = [row[1] for row in list(csv.reader(io.StringIO(capsys.readouterr().out)))[1:]]
        params = {"beam": beam}
        # MLflow's three JSON formats give the same captions
        for body in ({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}, "params": params},
                     {"dataframe_records": [{"image": i} for i in images], "params": params},
                     {"inputs": {"image": images}, "params": params}):
            assert post(port, body) == (200, {"predictions": expected}), (beam, list(body))
    status, answer = post(port, {"inputs": {"image": images[:1]}, "params": {"beam": 3, "max_len": 2}})
    assert status == 200 and len(answer["predictions"][0].split()) <= 2
    # Unless a request says otherwise, the model captions by the decoding the sweep chose for it on
    # the validation split (stored with it; its version's tags say which), as `captune caption` does.
    from captune.trainables.inference import caption_pixels, decoding_of, image_size_of
    from captune.trainables.model_source import load_captioner

    loaded = load_captioner("models:/captune-resnet-gru@champion", uri)
    stored, tags = decoding_of(loaded), finished_sweep_version_tags(uri)
    assert (stored.beam, stored.alpha) == (int(tags["decoding_beam"]), float(tags["decoding_alpha"]))
    pixels = request_pixels(images, image_size_of(loaded), allow_paths=False)
    by_stored = caption_pixels(loaded, pixels, stored)
    assert post(port, {"inputs": {"image": images}}) == (200, {"predictions": by_stored})
    assert main(["caption", "models:/captune-resnet-gru@champion", str(jpeg), str(png), "--tracking-uri", uri]) == 0
    assert [row[1] for row in list(csv.reader(io.StringIO(capsys.readouterr().out)))[1:]] == by_stored
    plain = caption_pixels(loaded, pixels, Decoding(beam=3, alpha=0.0))
    assert post(port, {"inputs": {"image": images}, "params": {"beam": 3, "alpha": 0.0}}) == (200, {"predictions": plain})

    bad = {
        "row 0: `image` is not base64": {"inputs": {"image": ["not base64!"]}},
        "row 1: not an image PIL can read": {"inputs": {"image": [images[0], base64.b64encode(b"text").decode()]}},
        "row 0: corrupt or truncated image": {"inputs": {"image": [images[0][:len(images[0]) // 8 * 4]]}},
        "empty input": {"inputs": {"image": []}},
        "over the 10 MB limit": {"inputs": {"image": ["A" * (14 * 2**20)]}},
        "unknown param(s) beem": {"inputs": {"image": images[:1]}, "params": {"beem": 3}},
        "param beam: must be in 1..20, got 21": {"inputs": {"image": images[:1]}, "params": {"beam": 21}},
        "param beam: must be in 1..20, got 0": {"inputs": {"image": images[:1]}, "params": {"beam": 0}},
        # a served model reads no file of the server's that a request names
        "row 0: `image` is not base64-encoded image content (starts": {"inputs": {"image": [str(jpeg)]}},
    }
    for message, body in bad.items():
        status, error = post(port, body)
        assert 400 <= status < 500 and message in error["message"], (message, status, error)
        assert "stack_trace" not in error and len(json.dumps(error)) < 2000  # the request is not echoed whole
    assert post(port, b"not json")[0] == 400
    assert post(port, {"inputs": {"image": images}, "params": {"beam": 3}})[0] == 200  # still serving


def test_logged_model_carries_its_signature_an_input_example_and_its_code(finished_sweep, tmp_path):
    from mlflow.models import get_model_info

    import mlflow

    mlflow.set_tracking_uri(finished_sweep.tracking_uri)
    info = get_model_info("models:/captune-cnn-lstm@champion")
    assert info.signature.inputs.input_names() == ["image"]
    # its param defaults: the decoding chosen for it on the validation split (its version's tags)
    tags = finished_sweep_version_tags(finished_sweep.tracking_uri, "captune-cnn-lstm")
    assert {p.name: p.default for p in info.signature.params.params} == {
        "beam": int(tags["decoding_beam"]), "max_len": int(tags["decoding_max_len"]) if tags["decoding_max_len"] != "None"
        else 30, "alpha": float(tags["decoding_alpha"])}
    assert float(tags["decoding_val_gain"]) >= 0  # (the grid holds the plain decoding: the best is no worse)
    assert info.saved_input_example_info is not None
    # the code it runs travels with it: a machine with its pip requirements serves it
    local = Path(mlflow.artifacts.download_artifacts("models:/captune-cnn-lstm@champion", dst_path=str(tmp_path)))
    code = local / "code" / "captune"  # a `captune` package of the layers it runs, and no other
    assert sorted(p.name for p in code.iterdir()) == ["__init__.py", "data", "infra", "serving", "trainables"]
    assert all((code / package / "__init__.py").is_file() for package in ("data", "infra", "trainables"))
    assert not list(local.rglob("__pycache__"))


def finished_sweep_version_tags(uri: str, name: str = "captune-resnet-gru") -> dict:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_model_version_by_alias(name, "champion").tags


# --- captioning folders --------------------------------------------------------------------------

def tiny_checkpoint(folder: Path) -> Path:
    """An untrained small captioner at 32 px: captions of random words, made in a second."""
    model = tiny("cnn-lstm").eval()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])
    return save_checkpoint(folder / "model.pt", model, vocab, encoder_trained=True,
                           train_config={"image_size": 32, "max_len": 6})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def photo_folder(synth_dir: Path, folder: Path, copies: int) -> list[str]:
    """Copies of the built-in images in nested folders, in every suffix case; other files beside."""
    sources = sorted((synth_dir / "Images").iterdir())
    for n in range(copies):
        sub = folder / f"roll{n % 3}" / ("deeper" if n % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        os.link(sources[n % len(sources)], sub / f"p{n:04d}.{('jpg', 'JPG', 'jpeg')[n % 3]}")
    Image.open(sources[0]).save(folder / "scan.PNG")
    (folder / "notes.txt").write_text("not an image")
    return find_images([folder])


def rows_of(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_caption_a_folder_killed_then_rerun_writes_each_image_once(tiny_model, synth_dir, tmp_path):
    images = photo_folder(synth_dir, tmp_path / "photos", copies=400)
    assert len(images) == 401 and not any(i.endswith(".txt") for i in images)
    out = tmp_path / "captions.csv"
    command = [sys.executable, "-m", "captune.cli", "caption", str(tiny_model), str(tmp_path / "photos"),
               "--out", str(out), "--batch-size", "1", "--beam", "3"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not out.exists() or out.read_text().count("\n") < 20:
        assert first.poll() is None, first.stderr.read().decode()
        time.sleep(0.02)
    first.kill()
    first.wait()
    written = out.read_text().count("\n") - 1
    assert 0 < written < len(images)
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    rows = rows_of(out)
    assert rows[0] == ["image", "caption"] and sorted(r[0] for r in rows[1:]) == sorted(images)  # each once
    assert f"({written:,} already there)" in again.stderr  # a row the kill cut short is redone
    # the captions are the model's: a fresh run over a few of the images gives the same
    assert main(["caption", str(tiny_model), *images[:5], "--beam", "3", "--out", str(tmp_path / "few.csv")]) == 0
    assert rows_of(tmp_path / "few.csv")[1:] == [r for r in rows[1:] if r[0] in images[:5]]


def test_caption_a_folder_with_a_broken_image_lists_it_and_says_so_by_exit_code(tiny_model, synth_dir, tmp_path,
                                                                               capsys):
    images = photo_folder(synth_dir, tmp_path / "photos", copies=6)
    (tmp_path / "photos" / "roll0" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(tiny_model), str(tmp_path / "photos"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'photos' / 'roll0' / 'broken.jpg'}: not an image PIL can read" in err
    assert "captioned 7 images" in err and "1 unreadable, skipped" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(images) and all(isinstance(r["caption"], str) for r in rows)
    # a row cut short (a kill while writing) is dropped and redone; the broken image is tried again
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:20])
    assert main(["caption", str(tiny_model), str(tmp_path / "photos"), "--out", str(out)]) == 1
    assert "captioned 1 images" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(images)


def test_caption_refuses_what_it_cannot_write_or_find(tiny_model, tmp_path, capsys):
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("id,label\n1,cat\n")
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    assert main(["caption", str(tiny_model), str(photo), "--out", str(theirs)]) == 2
    assert "not the header 'image,caption' of a caption file" in capsys.readouterr().err
    assert theirs.read_text() == "id,label\n1,cat\n"  # never overwritten
    assert main(["caption", str(tiny_model), str(photo), "--out", str(tmp_path / "c.txt")]) == 2
    assert "ending in .csv or .jsonl" in capsys.readouterr().err
    assert main(["caption", str(tiny_model), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such image file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(tiny_model), str(tmp_path / "empty")]) == 2
    assert "no .jpg, .jpeg or .png images in" in capsys.readouterr().err
    with pytest.raises(OutputFileError):
        CaptionFile(theirs)
