"""Champions: the best trial of each architecture registered as `captune-<arch>`, with the alias
`champion` moved only when the new model beats the current champion on the same validation split,
in the sweep's metric (BLEU-4 or CIDEr-D). Each version is tagged with its best epoch's validation
scores (`bleu1`..`bleu4`, `cider`, `rouge_l`), the `metric` that picked it, `epoch`, `val_key`."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from PIL import Image, ImageOps

from captune.data.layouts import load_corpus
from captune.infra.mlflow_logging import optional_step
from captune.infra.mlflow_names import DECODING_NOTE_TAG, FIGURES_NOTE_TAG
from captune.trainables.catalog import SCORE_LABELS, SCORES
from captune.trainables.checkpoint import load_checkpoint, read_payload
from captune.trainables.config import split_seed_of
from captune.trainables.decoding import Decoding
from captune.trainables.evaluation import evaluate_split
from captune.trainables.inference import caption_images
from captune.search.decoding_search import choose_decoding, decoding_tags
from captune.serving.logged_model import log_captioner
from captune.trainables.model_source import load_captioner

# matplotlib is imported where a figure is drawn, after its Agg backend is chosen.

ALIAS = "champion"
FAST_ALIAS = "fast"  # the fastest model within reach of the champion's score (captune.search.tradeoff)
LOCK_SUFFIX = ".promotion-lock"


def model_name(arch: str) -> str:
    return f"captune-{arch}"


def validation_key(data_root: str | Path, train_config: dict) -> str:
    """Identifies what a validation score was measured on: the images and captions of the
    validation split and the caption generation settings."""
    corpus = load_corpus(data_root, seed=split_seed_of(train_config))
    h = hashlib.sha256()
    for image in corpus.splits["val"][: train_config.get("val_images") or None]:
        h.update(image.encode() + b"\0" + "\0".join(corpus.captions[image]).encode() + b"\n")
    h.update(f"beam={train_config.get('val_beam', 1)} max_len={train_config.get('max_len')}".encode())
    return h.hexdigest()[:16]


def promote(client, arch: str, best: dict, data_root: str | Path, feature_set: str | None = None) -> dict:
    """Log the best trial's model in its run, with the decoding chosen for it on the validation
    split (captune.search.decoding_search), register it, and move the champion alias if it wins.
    `best`: captune.search.request.ArchOutcome.best, with the "checkpoint" of its best epoch;
    `feature_set`: the shared features its trials read, if any."""
    name, checkpoint = model_name(arch), Path(best["checkpoint"])
    payload = read_payload(checkpoint)
    if payload["model_config"]["arch"] != arch:  # never register one architecture under the other's name
        raise RuntimeError(f"{checkpoint}: a {payload['model_config']['arch']} checkpoint, not {arch}")
    if "epoch" in best and int(payload["epoch"]) != best["epoch"]:  # the best epoch's, as the objective says
        raise RuntimeError(f"{checkpoint}: the checkpoint of epoch {payload['epoch']}, not of trial "
                           f"{best['trial_id']}'s best epoch {best['epoch']}")
    key = validation_key(data_root, payload["train_config"])
    choice = None
    with tempfile.TemporaryDirectory() as tmp:
        loaded = write_champion_files(checkpoint, Path(tmp))
        with optional_step("the champion's figures", client, best["run_id"], FIGURES_NOTE_TAG):
            draw_champion_figures(loaded, data_root, Path(tmp))
        with optional_step("the decoding search", client, best["run_id"], DECODING_NOTE_TAG):
            choice = choose_decoding(loaded, data_root, best["metric"], feature_set)  # (else at beam 3)
        client.log_artifacts(best["run_id"], tmp, "champion")
    with mlflow.start_run(run_id=best["run_id"]):
        info = log_captioner(checkpoint, registered_name=name, decoding=choice.chosen if choice else None)
    version = str(info.registered_model_version)
    for tag, value in {**best["scores"], "metric": best["metric"], "epoch": payload["epoch"], "val_key": key,
                       "trial_id": best["trial_id"], **(choice.tags() if choice else {})}.items():
        client.set_model_version_tag(name, version, tag, str(value))
    with promotion_lock(client, name):
        record = claim_alias(client, name, version, best["score"], key, data_root, payload["train_config"],
                             best["metric"])
    return {**record, "decoding": choice.statement() if choice else None}


def register_fast(client, arch: str, run_id: str, checkpoint: Path | None, decoding: Decoding, tags: dict,
                  champion_version: str) -> tuple[str, bool]:
    """Register a trial's model at `decoding` as `captune-<arch>` (once: found again by its run and
    decoding; the champion's own version when it is the champion at its decoding) and move the
    alias `fast` to it, if the sweep's champion (`champion_version`) holds the champion alias:
    @fast is measured against that champion, not another sweep's. `checkpoint`: its best
    epoch's, None to take the champion's version. Returns (version, whether the alias moved)."""
    name = model_name(arch)
    if checkpoint is None:
        version = champion_version
    else:
        mine = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                if v.tags.get("decoding") == decoding.text() and v.tags.get("role") == FAST_ALIAS]
        if mine:
            version = mine[0].version
        else:
            with mlflow.start_run(run_id=run_id):
                version = str(log_captioner(checkpoint, registered_name=name, decoding=decoding).registered_model_version)
            for tag, value in {**tags, "role": FAST_ALIAS, **decoding_tags(decoding)}.items():
                client.set_model_version_tag(name, version, tag, str(value))
    with promotion_lock(client, name):
        try:
            holder = str(client.get_model_version_by_alias(name, ALIAS).version)  # (an int from some stores)
        except MlflowException:
            holder = None
        if holder != str(champion_version):
            return version, False
        client.set_registered_model_alias(name, FAST_ALIAS, version)
    return version, True


def claim_alias(client, name: str, version: str, score: float, key: str, data_root, train_config: dict,
                metric: str = "bleu4") -> dict:
    """Move the champion alias to `version` if it beats the current champion in `metric` (compared
    on the same validation split). Call it holding the promotion lock: it reads, compares, then writes."""
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        current = None
    result = {"name": name, "version": version, "metric": metric, "score": score, "previous": None,
              "promoted": False}
    if current is None:
        result["promoted"] = True
    else:
        mine, theirs = score, _champion_score(current, key, data_root, train_config, metric)
        if current.tags.get("val_key") != key:  # measured on other data: score both here, alike
            mine = _score(f"models:/{name}/{version}", data_root, train_config, metric)
        result["previous"] = {"version": current.version, "score": theirs}
        result["promoted"] = mine > theirs
    if result["promoted"]:
        client.set_registered_model_alias(name, ALIAS, version)
    return result


@contextmanager
def promotion_lock(client, name: str, timeout_s: float | None = None):
    """One promoter of `name` at a time, across processes and machines that share the tracking
    server: registering a model name is atomic in every MLflow store (the name is unique), so the
    lock is the registered model `<name>.promotion-lock`, created to take it, deleted to give it
    back. Two sweeps ending together otherwise both read the old champion, both win, and the
    alias ends on whichever wrote last."""
    lock = f"{name}{LOCK_SUFFIX}"
    timeout_s = float(os.environ.get("CAPTUNE_PROMOTION_LOCK_S", "600")) if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, description=f"held by {socket.gethostname()} pid {os.getpid()} "
                                                             f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if time.monotonic() > deadline:
                holder = client.get_registered_model(lock).description
                raise RuntimeError(f"{name}: the promotion lock {lock} ({holder}) was not released in {timeout_s:.0f}s. "
                                   f"If no sweep is registering {name} now, its holder died: delete the registered "
                                   f"model {lock} (MLflow UI, Models) and resume the sweep") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _champion_score(current, key: str, data_root, train_config: dict, metric: str) -> float:
    """The current champion's validation score in `metric`: from its tags when measured on the same
    split (a version registered before CIDEr-D has only bleu4), else scored here."""
    if current.tags.get("val_key") == key and metric in current.tags:
        return float(current.tags[metric])
    return _score(f"models:/{current.name}/{current.version}", data_root, train_config, metric)


def _score(uri: str, data_root, train_config: dict, metric: str) -> float:
    loaded = load_captioner(uri)
    return evaluate_split(loaded, data_root, split="val", beam=int(train_config.get("val_beam", 1)))[metric]


def write_champion_files(checkpoint: Path, out: Path):
    """vocab.json, config.json and val_scores.json (the epoch's validation scores, and the metric
    that picked it). Returns the loaded checkpoint."""
    loaded = load_checkpoint(checkpoint)
    payload = loaded.payload
    (out / "vocab.json").write_text(json.dumps(payload["vocab"], indent=1))
    (out / "config.json").write_text(json.dumps({"model": payload["model_config"],
                                                 "train": payload["train_config"]}, indent=2))
    epoch, metric = payload["history"][int(payload["epoch"]) - 1], payload["train_config"].get("metric", "bleu4")
    (out / "val_scores.json").write_text(json.dumps({"epoch": payload["epoch"], "metric": metric,
                                                     **{k: epoch[k] for k in SCORES if k in epoch}}, indent=2))
    return loaded


def draw_champion_figures(loaded, data_root: str | Path, out: Path, images: int = 8) -> None:
    """learning_curves.png (loss; BLEU-1..4 and ROUGE-L; CIDEr-D) and val_examples.png
    (validation images with the generated caption above the references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = loaded.payload
    history, metric = payload["history"], payload["train_config"].get("metric", "bleu4")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.5))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss (cross-entropy per token)")
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        ax2.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", label=SCORE_LABELS[k],
                 linestyle="--" if k == "rouge_l" else "-")
    ax2.set(xlabel="epoch", ylabel="validation score", ylim=(0, 1))
    ax2.legend(fontsize=8)
    ax3.plot(epochs, [h.get("cider", float("nan")) for h in history], marker="o", color="C5")
    ax3.set(xlabel="epoch", ylabel="validation CIDEr-D", ylim=(0, None))
    for ax in (ax2, ax3):  # the epoch whose model this is
        ax.axvline(int(payload["epoch"]), color="0.6", linestyle=":", linewidth=1)
    fig.suptitle(f"best epoch {payload['epoch']} by validation {SCORE_LABELS[metric]} (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)

    corpus = load_corpus(data_root, seed=split_seed_of(payload["train_config"]))
    names = corpus.splits["val"][:images]
    paths = [corpus.image_path(n) for n in names]
    hyps = caption_images(loaded, paths, 1)  # greedy
    examples_figure(paths, hyps, [corpus.captions[n] for n in names], out / "val_examples.png")


def examples_figure(paths: list[Path], hyps: list[str], refs: list[list[str]], path: Path, cols: int = 4) -> None:
    """Each example: the image, then below it, in a panel of its own, the model's caption
    (greedy, labelled and in colour) and three references, wrapped at the image's width."""
    import matplotlib.pyplot as plt  # (the caller chose the Agg backend)

    def wrap(text: str, width: int = 40) -> str:
        return textwrap.fill(text, width, subsequent_indent="  ")

    rows = -(-len(paths) // cols)
    fig = plt.figure(figsize=(4.2 * cols, 7.0 * rows))
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3.4, 3.0] * rows, hspace=0.05, wspace=0.08)
    for i, (image, hyp, theirs) in enumerate(zip(paths, hyps, refs)):
        row, col = divmod(i, cols)
        picture, words = fig.add_subplot(grid[2 * row, col]), fig.add_subplot(grid[2 * row + 1, col])
        with Image.open(image) as shown:  # upright, as the model saw it (its EXIF orientation)
            picture.imshow(ImageOps.exif_transpose(shown).convert("RGB"))
        picture.set_title(Path(image).name, fontsize=9, color="0.4")
        for ax in (picture, words):
            ax.axis("off")
        words.text(0, 1, wrap("model: " + hyp, 32), fontsize=10.5, fontweight="bold", color="C0", va="top",
                   transform=words.transAxes)
        words.text(0, 0.58, "references:\n" + "\n".join(wrap(f"- {r}") for r in theirs[:3]), fontsize=10,
                   color="0.25", va="top", transform=words.transAxes)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
