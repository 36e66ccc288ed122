import json
from pathlib import Path

import pytest

from captune.data.check import check_dataset
from captune.data.layouts import LayoutError, load_corpus
from tests import datasets
from tests.conftest import SHARED_FLICKR


def test_kaggle_layout_reads_quoted_captions_and_splits_by_image(tmp_path):
    caps = datasets.sample_captions(20)
    corpus = load_corpus(datasets.kaggle(tmp_path, caps))
    assert corpus.layout == "kaggle" and not corpus.problems
    assert corpus.captions["img003.jpg"] == caps["img003.jpg"]  # commas and "" survive the CSV
    assert corpus.captions["img003.jpg"][2] == 'a "quoted" dog'
    sizes = {s: len(v) for s, v in corpus.splits.items()}
    assert sizes == {"train": 16, "val": 2, "test": 2}
    assert load_corpus(tmp_path).splits == corpus.splits  # deterministic
    assert load_corpus(tmp_path, seed=5).splits != corpus.splits
    every = [im for names in corpus.splits.values() for im in names]
    assert sorted(every) == sorted(caps)  # each image in exactly one split


def test_original_layout_uses_official_split_and_reports_problems(tmp_path):
    caps = datasets.sample_captions(8)
    caps["ghost.jpg.1"] = ["a caption for an image that does not exist"]
    splits = {"train": [f"img00{i}.jpg" for i in range(4)], "val": ["img004.jpg"], "test": ["img005.jpg"]}
    root = datasets.original(tmp_path, caps, splits, images=[f"img00{i}.jpg" for i in range(8)])
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "no tab on this line\nimg001.jpg#0\ta duplicate id\n")
    corpus = load_corpus(root)
    assert corpus.layout == "original"
    assert {s: len(v) for s, v in corpus.splits.items()} == {"train": 4, "val": 1, "test": 1}
    kinds = sorted(p.kind for p in corpus.problems)
    assert kinds == ["duplicate_entry", "malformed_line", "missing_image", "no_split", "no_split"]
    missing = next(p for p in corpus.problems if p.kind == "missing_image")
    assert missing.image == "ghost.jpg.1" and missing.line == 25 and missing.file.endswith("Flickr8k.token.txt")
    malformed = next(p for p in corpus.problems if p.kind == "malformed_line")
    assert malformed.line == 26


def test_karpathy_layout(tmp_path):
    caps = datasets.sample_captions(6)
    split_of = dict(zip(caps, ["train", "restval", "train", "val", "test", "test"]))
    corpus = load_corpus(datasets.karpathy(tmp_path, caps, split_of))
    assert corpus.layout == "karpathy" and not corpus.problems
    assert {s: len(v) for s, v in corpus.splits.items()} == {"train": 3, "val": 1, "test": 2}


def test_karpathy_files_of_flickr30k_and_coco(tmp_path):
    caps = datasets.sample_captions(6)
    split_of = dict(zip(caps, ["train", "restval", "train", "val", "test", "test"]))
    flickr30k = load_corpus(datasets.karpathy(tmp_path / "f30k", caps, split_of, "flickr30k", "flickr30k-images"))
    assert flickr30k.caption_file.name == "dataset_flickr30k.json" and not flickr30k.problems
    assert flickr30k.image_dir.name == "flickr30k-images" and len(flickr30k.splits["train"]) == 3
    # COCO: images keyed by their subfolder, under images/ or the root, restval counted as train
    for image_dir in ("images", "."):
        root = datasets.karpathy(tmp_path / f"coco-{image_dir}", caps, split_of, "coco", image_dir)
        coco = load_corpus(root)
        assert not coco.problems, coco.problems
        assert coco.splits["train"] == ["train2014/img000.jpg", "val2014/img001.jpg", "train2014/img002.jpg"]
        assert coco.image_path("val2014/img003.jpg").is_file()
    (root / "val2014" / "img003.jpg").unlink()
    (root / "val2014" / "img004.jpg").write_bytes(b"not a jpeg")
    report = check_dataset(root)
    assert {(p["kind"], p["image"]) for p in report["problems"]} == {
        ("missing_image", "val2014/img003.jpg"), ("corrupt_image", "val2014/img004.jpg")}
    assert report["splits"] == {"train": 3, "val": 1, "test": 2}


def test_crlf_and_bom_are_accepted(tmp_path):
    root = datasets.kaggle(tmp_path, datasets.sample_captions(10))
    text = (root / "captions.txt").read_text()
    (root / "captions.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    corpus = load_corpus(root)
    assert not corpus.problems and corpus.num_captions() == 30


def test_unknown_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(LayoutError, match="unknown dataset layout .*nothing"):
        load_corpus(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LayoutError, match="notes.txt"):
        load_corpus(tmp_path)


def test_check_report_lists_every_problem_with_file_and_line(tmp_path):
    caps = datasets.sample_captions(12)
    root = datasets.kaggle(tmp_path, caps, images=[im for im in caps if im != "img002.jpg"])
    (root / "Images" / "img003.jpg").write_bytes(b"")  # zero bytes
    good = (root / "Images" / "img004.jpg").read_bytes()
    (root / "Images" / "img004.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "Images" / "img005.jpg").write_text("not an image")
    with open(root / "captions.txt", "a") as f:
        f.write("img006.jpg,a caption,with,too many fields\nimg007.jpg,\"  .  \"\n")
    report = check_dataset(root)
    json.dumps(report)
    got = {(p["kind"], p.get("image") or "") for p in report["problems"]}
    assert ("missing_image", "img002.jpg") in got
    assert {("corrupt_image", f"img00{i}.jpg") for i in (3, 4, 5)} <= got
    assert ("malformed_line", "") in got and ("empty_caption", "") in got
    lines = {p["kind"]: p["line"] for p in report["problems"]}
    assert lines["malformed_line"] == 38 and lines["empty_caption"] == 39
    assert lines["missing_image"] == 8


@pytest.mark.skipif(not SHARED_FLICKR.is_dir(), reason="real Flickr8k caption files not present")
@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
class TestRealFlickr8k:
    def _images(self, root: Path, names):
        # Stand-in images under the real names: links to one tiny JPEG keep this fast.
        datasets.write_images(root / "_one", ["one.jpg"])
        folder = root / ("Images" if (root / "captions.txt").exists() else "Flicker8k_Dataset")
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).hardlink_to(root / "_one" / "one.jpg")

    def test_kaggle_captions_txt(self, tmp_path):
        (tmp_path / "captions.txt").write_bytes((SHARED_FLICKR / "captions.txt").read_bytes())
        names = sorted({line.split(",", 1)[0] for line in (SHARED_FLICKR / "captions.txt").read_text().splitlines()[1:]})
        self._images(tmp_path, names)
        report = check_dataset(tmp_path)
        assert (report["layout"], report["images"], report["captions"]) == ("kaggle", 8091, 40455)
        assert report["problems"] == []

    def test_original_token_file_and_splits(self, tmp_path):
        text = tmp_path / "Flickr8k_text"
        text.mkdir()
        for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                     "Flickr_8k.testImages.txt"):
            (text / name).write_bytes((SHARED_FLICKR / name).read_bytes())
        names = {ln.split("#")[0] for ln in (text / "Flickr8k.token.txt").read_text().splitlines()}
        self._images(tmp_path, sorted(names - {"2258277193_586949ec62.jpg.1"}))  # the id with no image
        report = check_dataset(tmp_path)
        assert report["layout"] == "original"
        assert report["splits"] == {"train": 6000, "val": 1000, "test": 1000}
        assert report["unsplit_images"] == 91
        errors = [p for p in report["problems"] if p["severity"] == "error"]
        assert [(p["kind"], p["image"]) for p in errors] == [("missing_image", "2258277193_586949ec62.jpg.1")]
        unsplit = sorted(p["image"] for p in report["problems"] if p["kind"] == "no_split")
        assert unsplit == (SHARED_FLICKR / "images_without_split.txt").read_text().split()


def test_links_leading_outside_the_dataset_are_refused_not_followed(tmp_path):
    import shutil

    from captune.data.check import check_dataset
    from captune.data.prepare import DataProblems, prepare_data

    caps = datasets.sample_captions(40)  # 4 validation images: 2 bad ones still leave some
    root = datasets.kaggle(tmp_path / "data", caps)
    elsewhere = tmp_path / "elsewhere.jpg"
    shutil.move(root / "Images" / "img001.jpg", elsewhere)
    (root / "Images" / "img001.jpg").symlink_to(elsewhere)  # an image, but not in the dataset
    (root / "Images" / "img000.jpg").unlink()
    (root / "Images" / "img000.jpg").symlink_to("/etc/hostname")
    inside = root / "Images" / "img002.jpg"
    shutil.move(inside, root / "kept.jpg")
    inside.symlink_to(root / "kept.jpg")  # a link within the dataset folder is fine
    report = check_dataset(root)
    outside = {p["image"]: p for p in report["problems"] if p["kind"] == "outside_dataset"}
    assert set(outside) == {"img000.jpg", "img001.jpg"}
    assert "/etc/hostname" in outside["img000.jpg"]["detail"] and outside["img000.jpg"]["line"] is not None
    assert not any(p["kind"] == "corrupt_image" for p in report["problems"])  # /etc/hostname never opened
    with pytest.raises(DataProblems, match="img000.jpg is a link to /etc/hostname"):
        prepare_data(root, 32, tmp_path / "cache")
    data = prepare_data(root, 32, tmp_path / "cache", skip_bad=True, progress=False)
    assert {p.image for p in data.skipped} == {"img000.jpg", "img001.jpg"}
    # the image folder itself may be a link (a dataset on another disk)
    moved = tmp_path / "disk2" / "Images"
    moved.parent.mkdir()
    shutil.move(root / "Images", moved)
    (root / "Images").symlink_to(moved)
    (moved / "img000.jpg").unlink()
    (moved / "img001.jpg").unlink()
    shutil.copy(root / "kept.jpg", moved / "img000.jpg")
    shutil.copy(root / "kept.jpg", moved / "img001.jpg")
    assert not [p for p in check_dataset(root)["problems"] if p["severity"] == "error"]
