"""`captune caption --out`: what a hostile user (or a hand edit, Excel, a second terminal) can do to
the output file and the images, and what the command does about it."""
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from captune.caption_files import CaptionFile, OutputFileError
from captune.cli import main
from tests.filesystems import immutable, tmpfs
from tests.test_serving import photo_folder, rows_of, tiny_model  # noqa: F401 (tiny_model: a fixture)

BAD_NAME = os.fsdecode(b"bad\xff name.jpg")  # bytes that are not UTF-8, as a file name may hold
ODD_NAME = 'a "quote", a comma\r\nand a new line.jpg'  # what CSV quotes


def command(model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "captune.cli", "caption", str(model), *map(str, args)]


def caption(model: Path, *args) -> int:
    return main(["caption", str(model), *map(str, args)])


def images_in_csv(path: Path) -> list[str]:
    return [row[0] for row in rows_of(path)[1:]]


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_second_caption_into_a_file_being_written_is_refused_and_each_image_is_written_once(
        tiny_model, synth_dir, tmp_path):
    images = photo_folder(synth_dir, tmp_path / "photos", copies=1500)  # seconds of work, one at a time
    out = tmp_path / "same.csv"
    run = command(tiny_model, tmp_path / "photos", "--out", out, "--batch-size", "1")
    first = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not out.exists() or out.read_text().count("\n") < 5:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.02)
        second = subprocess.run(run, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first command ended before the second started: no overlap tested"
    finally:
        first_err = first.communicate(timeout=300)[1]
    assert second.returncode == 2, second.stderr
    assert f"--out {out}: another `captune caption` is writing this file" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err
    rows = rows_of(out)
    assert rows[0] == ["image", "caption"] and sorted(r[0] for r in rows[1:]) == sorted(images)  # each once


def test_the_lock_is_taken_before_the_model_loads(tmp_path, capsys):
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    out = tmp_path / "c.csv"
    held = CaptionFile(out)
    try:
        # a model that does not exist: the lock is refused first, at once
        assert caption(tmp_path / "no-such-model.pt", photo, "--out", out) == 2
        assert "another `captune caption` is writing this file" in capsys.readouterr().err
    finally:
        held.close()
    assert caption(tmp_path / "no-such-model.pt", photo, "--out", out) == 2
    assert "another `captune caption`" not in capsys.readouterr().err  # released at close


# --- a hand edit the csv parser would swallow -----------------------------------------------------

EDITS = {
    "a stray quote": lambda image, text: f'{image},"{text}\r\n',
    "three fields": lambda image, text: f"{image},{text},more\r\n",
    "a second header": lambda image, text: f"image,caption\r\n{image},{text}\r\n",
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_caption_file_that_does_not_parse_is_refused_naming_its_line_and_never_written(
        tiny_model, synth_dir, tmp_path, capsys, edit):
    photo_folder(synth_dir, tmp_path / "photos", copies=6)
    out = tmp_path / "c.csv"
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    lines = out.read_text().splitlines(keepends=True)
    lines[3] = EDITS[edit](*lines[3].rstrip("\r\n").split(","))
    out.write_text("".join(lines))
    before = out.read_bytes()
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"--out {out}, line 4:" in err and "fix it or give a new file" in err
    assert out.read_bytes() == before  # never written


def test_a_jsonl_caption_file_with_a_bad_line_is_refused_naming_it(tiny_model, synth_dir, tmp_path, capsys):
    photo_folder(synth_dir, tmp_path / "photos", copies=3)
    out = tmp_path / "c.jsonl"
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2] + ['{"image": "x.jpg", "caption": 3}\n'] + lines[2:]))
    before = out.read_bytes()
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"--out {out}, line 3:" in err and "fix it or give a new file" in err
    assert out.read_bytes() == before


# --- one image, many spellings --------------------------------------------------------------------

def test_an_image_named_several_ways_is_captioned_once_in_its_first_spelling(
        tiny_model, synth_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = photo_folder(synth_dir, Path("imgs"), copies=5)
    one = images[2]
    (tmp_path / "link.jpg").symlink_to(tmp_path / one)
    out = tmp_path / "c.csv"
    assert caption(tiny_model, "imgs", one, f"./{one}", tmp_path / one, "link.jpg", "imgs/", "--out", out) == 0
    assert images_in_csv(out) == images  # each file once, as the folder named it
    # spelled otherwise, an image already in the file counts as done
    assert caption(tiny_model, f"./{one}", tmp_path / one, "link.jpg", tmp_path / "imgs", "--out", out) == 0
    assert "captioned 0 images" in capsys.readouterr().err
    assert images_in_csv(out) == images


# --- empty captions, Excel's BOM ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_row_with_an_empty_caption_is_redone_and_kept_once(tiny_model, synth_dir, tmp_path, capsys, suffix):
    images = photo_folder(synth_dir, tmp_path / "photos", copies=4)
    out = tmp_path / f"c{suffix}"
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    if suffix == ".csv":
        rows = rows_of(out)
        rows[2][1] = ""
        with out.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        rows[1]["caption"] = ""
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    assert f"captioned 1 images in {out} (4 already there)" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    done = rows_of(out)[1:] if suffix == ".csv" else [list(json.loads(line).values()) for line in lines]
    assert sorted(image for image, _ in done) == sorted(images)  # each once
    assert all(text for _, text in done)


def test_a_file_rewritten_to_drop_empty_captions_stays_locked(tmp_path):
    out = tmp_path / "c.csv"
    out.write_bytes(b"\xef\xbb\xbfimage,caption\r\na.jpg,w1\r\nb.jpg,\r\nc.jpg,w2\r\nd.jpg,w3")  # d: cut short
    held = CaptionFile(out)
    try:
        assert out.read_bytes() == b"\xef\xbb\xbfimage,caption\r\na.jpg,w1\r\nc.jpg,w2\r\n"
        assert held.done == {os.path.realpath(image) for image in ("a.jpg", "c.jpg")}
        with pytest.raises(OutputFileError, match="another `captune caption` is writing this file"):
            CaptionFile(out)  # the lock moved to the new file with it
        held.write([("b.jpg", "w4")])
    finally:
        held.close()
    assert out.read_bytes().endswith(b"c.jpg,w2\r\nb.jpg,w4\r\n") and os.listdir(tmp_path) == ["c.csv"]


def test_a_caption_file_saved_by_excel_with_a_bom_is_accepted(tiny_model, synth_dir, tmp_path, capsys):
    images = photo_folder(synth_dir, tmp_path / "photos", copies=4)
    out = tmp_path / "c.csv"
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    out.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    capsys.readouterr()
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    assert f"captioned 0 images in {out} (5 already there)" in capsys.readouterr().err
    assert images_in_csv(out) == images


# --- names that are not UTF-8 ---------------------------------------------------------------------

def odd_folder(synth_dir: Path, folder: Path) -> list[str]:
    images = photo_folder(synth_dir, folder, copies=2)
    os.link(images[0], folder / BAD_NAME)
    os.link(images[1], folder / ODD_NAME)
    return sorted([*images, str(folder / BAD_NAME), str(folder / ODD_NAME)])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_image_names_that_are_not_utf8_are_written_and_read_back_exactly(tiny_model, synth_dir, tmp_path, capsys,
                                                                        suffix):
    images = odd_folder(synth_dir, tmp_path / "photos")
    out = tmp_path / f"c{suffix}"
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0
    if suffix == ".csv":
        assert os.fsencode(tmp_path / "photos" / BAD_NAME) in out.read_bytes()  # the name's own bytes
        written = [row[0] for row in csv.reader(io.StringIO(out.read_bytes().decode("utf-8", "surrogateescape")))][1:]
    else:
        written = [json.loads(line)["image"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(written) == images
    capsys.readouterr()
    assert caption(tiny_model, tmp_path / "photos", "--out", out) == 0  # a rerun skips them
    assert f"captioned 0 images in {out} ({len(images)} already there)" in capsys.readouterr().err


@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
def test_image_names_that_are_not_utf8_go_to_stdout_as_their_bytes(tiny_model, synth_dir, tmp_path):
    odd_folder(synth_dir, tmp_path / "photos")
    # as in a UTF-8 locale such as en_US.UTF-8 (C.UTF-8 would let Python escape them itself)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run(command(tiny_model, tmp_path / "photos"), capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert os.fsencode(tmp_path / "photos" / BAD_NAME) + b"," in done.stdout


# --- an --out that cannot be written --------------------------------------------------------------

@pytest.mark.parametrize("fault", ["immutable folder", "immutable file", "read-only file system"])
def test_an_out_file_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, fault):
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    no_model = tmp_path / "no-such-model.pt"  # the refusal must come before the model is looked for
    folder = tmp_path / "out"
    if fault == "immutable file":
        folder.mkdir()
        (folder / "c.csv").write_text("image,caption\r\n")
        fixed = immutable(folder / "c.csv")
        expected = f"--out {folder / 'c.csv'}: cannot write it (Operation not permitted)"
    elif fault == "immutable folder":
        folder.mkdir()
        fixed, expected = immutable(folder), f"--out: cannot write in {folder} (Operation not permitted)"
    else:
        fixed = tmpfs(folder, size="1m", read_only=True)
        expected = f"--out: cannot write in {folder} (Read-only file system)"
    with fixed:
        assert caption(no_model, photo, "--out", folder / "c.csv") == 2
        assert expected in capsys.readouterr().err


# --- links to nothing, loops, FIFOs ---------------------------------------------------------------

@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
def test_links_to_nothing_loops_and_fifos_in_a_folder_are_listed_not_skipped(tiny_model, synth_dir, tmp_path):
    folder = tmp_path / "photos"
    images = photo_folder(synth_dir, folder, copies=2)
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    (folder / "loop1.jpg").symlink_to(folder / "loop2.jpg")
    (folder / "loop2.jpg").symlink_to(folder / "loop1.jpg")
    os.mkfifo(folder / "pipe.jpg")
    out = tmp_path / "c.csv"
    # in a process of its own: a FIFO opened for reading would block it for ever
    done = subprocess.run(command(tiny_model, folder, "--out", out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"skipped {folder / 'gone.jpg'}: a link to {folder / 'deleted.jpg'}, which does not exist" in done.stderr
    assert f"skipped {folder / 'loop1.jpg'}: a loop of symbolic links" in done.stderr
    assert f"skipped {folder / 'pipe.jpg'}: a FIFO (named pipe), not an image file" in done.stderr
    assert "4 unreadable, skipped" in done.stderr and "Traceback" not in done.stderr
    assert sorted(images_in_csv(out)) == sorted(images)
