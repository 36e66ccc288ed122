"""The `captune` command: a thin layer over the library functions."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from captune.commands import (cmd_caption, cmd_check, cmd_compare, cmd_evaluate, cmd_features, cmd_leaderboard,
                              cmd_record, cmd_speed, cmd_sweep, cmd_synth, cmd_train)
from captune.infra.errors import UserError
from captune.infra.package_files import package_folder
from captune.infra.raycluster import signal_name, stop_on_signals
from captune.trainables.catalog import ARCHS, CAPTION_BEAM, MAX_ALPHA, MAX_BEAM, OBJECTIVES, RESNET_ENCODERS, VGG_ENCODERS


def entry() -> None:
    """The console script: `main`, then exit."""
    code = main()
    # The process ends now: exempting every object from the collector's last passes saves ~1.5 s
    # of the interpreter's exit once torch, Ray and MLflow are loaded (a Ctrl-C should end a
    # command in seconds). Objects are still finalized as usual.
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model download
    stop_on_signals()
    try:
        return args.run(args) or 0
    except KeyboardInterrupt as e:
        print(f"captune: stopped by {signal_name(e)}", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as e:
        print(f"captune: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: a usage error; a few say otherwise (a sweep that failed: 1)


# --- parser --------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _duration(text: str) -> float:
    from captune.search.budget import parse_duration

    try:
        return parse_duration(text, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


def _beam(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_BEAM:
        raise argparse.ArgumentTypeError(f"beam width must be in 1..{MAX_BEAM} (1 = greedy; papers use 3-5), "
                                         f"got {value}")
    return value


def _score_difference(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"a validation score difference, 0 or more, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


# captune.search.bootstrap.min_resamples() for its 95 % interval, here as a number: the parser answers before
# numpy loads (tests/test_refusals.py checks the two agree)
MIN_RESAMPLES = 200


def _resamples(text: str) -> int:
    value = int(text)
    if value < MIN_RESAMPLES:
        raise argparse.ArgumentTypeError(f"a 95% bootstrap interval needs at least {MIN_RESAMPLES} resamples (at least "
                                         f"5 beyond each end of it), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captune", description=__doc__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="write or check datasets").add_subparsers(required=True, metavar="ACTION")
    s = data.add_parser("synth", help="write the built-in dataset of shape scenes (Kaggle layout)")
    s.add_argument("--out", required=True, help="folder to write")
    s.add_argument("--images", type=_positive, default=3000, help="number of images (default 3000)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=cmd_synth)
    c = data.add_parser("check", help="report a dataset's layout, sizes and every problem")
    c.add_argument("dir")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--seed", type=int, default=0, help="seed of the split for layouts without one")
    c.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    c.set_defaults(run=cmd_check)

    t = sub.add_parser("train", help="train one captioner with Ray Train")
    t.add_argument("--arch", choices=ARCHS, help="required, unless --resume")
    t.add_argument("--data", help="dataset folder (any Flickr8k layout); required, unless --resume")
    t.add_argument("--workers", type=_positive, help="Ray Train workers (DDP; default 1)")
    t.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); else CPUs (gloo)")
    t.add_argument("--epochs", type=_positive)
    t.add_argument("--config", help="YAML file of settings (over the dataset's preset)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    t.add_argument("--image-blind", action="store_true", help="control run: shuffle images against captions")
    t.add_argument("--skip-bad", action="store_true", help="leave out bad dataset items (counted)")
    t.add_argument("--out", help="output folder (default runs/ARCH-TIME)")
    t.add_argument("--resume", metavar="OUT", help="go on from the last finished epoch of the run in OUT, with "
                   "its settings (after a stop; or with more --epochs)")
    _tracking_args(t)
    t.add_argument("--experiment", default="captune-train", help="MLflow experiment name")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    t.set_defaults(run=cmd_train)

    r = sub.add_parser("record", help="complete the MLflow run of a `captune train` output folder "
                                      "(when the store was down or locked as training ended)")
    r.add_argument("out", help="the --out folder of `captune train`")
    r.add_argument("--wait", type=float, default=0.0, help="seconds to keep trying while the store does not answer")
    r.set_defaults(run=cmd_record)

    f = sub.add_parser("features", help="build a frozen encoder's feature cache once, with Ray Data across the "
                                         "cluster, in the shared storage the trials read")
    f.add_argument("--data", required=True, help="dataset folder (any supported layout)")
    f.add_argument("--encoder", required=True, choices=VGG_ENCODERS + RESNET_ENCODERS)
    f.add_argument("--image-size", type=_positive, help="pixels per side (default: the dataset's preset, else 224)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another setting the features depend on: pretrained, seed, skip_bad, split_seed")
    f.add_argument("--storage", help="a folder every node mounts, or s3://... (default: $CAPTUNE_STORAGE); the "
                                     "cache goes to its features/ folder")
    f.add_argument("--images-from", metavar="URI", help="a copy of the dataset folder in object storage "
                   "(s3://...) where the job's tasks on every node read the images; only this machine then "
                   "needs --data")
    f.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    f.set_defaults(run=cmd_features)

    sweeps = package_folder("captune.search")  # where the sweep files are installed (not imported: --help stays light)
    w = sub.add_parser("sweep", help="Ray Tune + Optuna search per architecture, on validation BLEU-4 or CIDEr-D")
    w.add_argument("--data", required=True, help="dataset folder (any Flickr8k layout)")
    w.add_argument("--arch", default=",".join(ARCHS), help="comma-separated architectures (default: both)")
    w.add_argument("--trials", type=_positive, help="trials per architecture (default: the config's)")
    w.add_argument("--epochs", type=_positive, help="maximum epochs per trial (default: the config's)")
    w.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="stop searching after this long (90s, 30m, 6h, 1h30m): no trial starts after it, running "
                        "trials stop at their next epoch (recorded out-of-time, checkpoints kept); the controls, "
                        "replicates and comparison run after it (default: the config's time_budget, else none)")
    w.add_argument("--metric", choices=OBJECTIVES,
                   help="validation score to maximise: bleu4 or cider (CIDEr-D) (default: the config's, bleu4)")
    w.add_argument("--name", default="captune-sweep", help="sweep name: MLflow experiment and Tune folder; letters, "
                   "digits, '.', '_' and '-', starting with a letter or a digit, at most 100 characters, no '..'")
    w.add_argument("--config", help=f"sweep YAML (default: {sweeps / 'spaces.yaml'}; a smaller one that runs "
                                    f"in minutes: {sweeps / 'demo.yaml'}; copy one to change it)")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a setting for all trials")
    w.add_argument("--workers-per-trial", type=_positive, default=1, help="DDP workers per trial")
    w.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker; fractions pack trials on a GPU (default 0: CPU)")
    w.add_argument("--storage", default=None,
                   help="Tune results: a folder, s3://..., or a shared mount (default: $CAPTUNE_STORAGE/sweeps "
                        "when CAPTUNE_STORAGE is set, as on a cluster.yaml cluster, else runs/sweeps)")
    w.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this --name")
    w.add_argument("--warm-start", metavar="SWEEP",
                   help="start each search from what the trials of an earlier sweep (same store, same metric) found: "
                        "they are told to its Optuna sampler, not trained again")
    w.add_argument("--more-trials", type=_positive, default=0, metavar="N",
                   help="with --resume: add N trials to each finished search of the sweep; its Optuna study goes "
                        "on (the sampler told every earlier trial), nothing is trained again")
    w.add_argument("--seeds", type=_non_negative,
                   help="choose each champion over seeds: each search's top configurations (--top) retrained with K "
                        "new seeds, the best mean validation score wins; then `captune compare --seeds K` (default 0; "
                        "with --resume, what the sweep started with)")
    w.add_argument("--top", type=_positive,
                   help="with --seeds: how many configurations per search are retrained (default 3; with --resume, "
                        "what the sweep started with)")
    w.add_argument("--fast-within", type=_score_difference, metavar="X",
                   help="@fast: the fastest model whose validation score is within X of the champion's (default: "
                        "the seed noise --seeds measures; with --resume, what the sweep started with)")
    w.add_argument("--no-control", action="store_true",
                   help="skip the image-blind control run of each champion (the floor its score must clear)")
    _tracking_args(w)
    w.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    w.add_argument("--verbose", action="store_true",
                   help="Ray Tune's own status output and every trial's epoch lines, instead of the sweep's view")
    w.set_defaults(run=cmd_sweep)

    lb = sub.add_parser("leaderboard", help="a sweep's trials by their best validation score, its controls and "
                                            "importances, from MLflow")
    lb.add_argument("name")
    lb.add_argument("--json", action="store_true")
    lb.add_argument("--top", type=_positive)
    _tracking_args(lb)
    lb.set_defaults(run=cmd_leaderboard)

    cp = sub.add_parser("compare", help="a sweep's champions on the test split, against their controls and each "
                                        "other (paired bootstrap), optionally over seed replicates")
    cp.add_argument("name")
    cp.add_argument("--data", help="dataset folder (default: the sweep's)")
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--skip-bad", action="store_true",
                    help="leave out bad items (implied for a champion that trained with --skip-bad)")
    cp.add_argument("--seeds", type=_non_negative, default=0,
                    help="retrain each champion's configuration with K new seeds (default 0: none)")
    cp.add_argument("--resamples", type=_resamples, default=1000,
                    help=f"bootstrap resamples, at least {MIN_RESAMPLES} (default 1000)")
    cp.add_argument("--bootstrap-seed", type=_non_negative, default=0, help="seed of the bootstrap's resampling")
    cp.add_argument("--address", help="Ray cluster address for --seeds (default: RAY_ADDRESS, else a local cluster)")
    _tracking_args(cp)
    cp.set_defaults(run=cmd_compare)

    sp = sub.add_parser("speed", help="measure a sweep's trials' latency and size, their Pareto fronts and @fast "
                                      "again (on this machine: the one you serve from)",
                        description="Each finished trial's model: parameters, checkpoint MB, latency per image at "
                                    "batch 1 (p50, p90) and throughput at batch 32, greedy and at the champion's "
                                    "decoding, on one core and one torch thread; then each architecture's Pareto "
                                    "front of validation score against latency, and @fast registered. `captune "
                                    "sweep` does this as it ends; this measures again.")
    sp.add_argument("name")
    sp.add_argument("--data", help="dataset folder (default: the sweep's)")
    sp.add_argument("--fast-within", type=_score_difference, metavar="X",
                    help="@fast within X of the champion's validation score (default: the sweep's, else its seed "
                         "noise)")
    _tracking_args(sp)
    sp.set_defaults(run=cmd_speed)

    e = sub.add_parser("evaluate", help="BLEU-1..4, CIDEr-D and ROUGE-L of a model on a dataset split")
    e.add_argument("model", help="checkpoint path, or MLflow URI (runs:/ID/model, models:/NAME@ALIAS)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    _decoding_args(e)
    e.add_argument("--skip-bad", action="store_true")
    e.add_argument("--json", action="store_true")
    _tracking_args(e)
    e.set_defaults(run=cmd_evaluate)

    k = sub.add_parser("caption", help="caption image files and folders (CSV or JSON lines; a rerun goes on)",
                       description="Caption images: files, and folders searched recursively for .jpg, .jpeg and "
                                   ".png. Rows image,caption go to --out (CSV, or JSON lines for .jsonl) as they "
                                   "are captioned, else to stdout as CSV; a rerun with the same --out skips the "
                                   "images already in it. Unreadable images are listed and skipped: exit code 1.")
    k.add_argument("model", help="checkpoint path, or MLflow URI (runs:/ID/model, models:/NAME@ALIAS)")
    k.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder")
    _decoding_args(k)
    k.add_argument("--out", type=Path, help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    k.add_argument("--batch-size", type=_positive, default=32, help="images captioned at once")
    _tracking_args(k)
    k.set_defaults(run=cmd_caption)
    return p


def _decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=_beam, help=f"beam width, 1..{MAX_BEAM} (1 = greedy; default: the decoding "
                                              f"stored with the model when it was registered, else {CAPTION_BEAM})")
    p.add_argument("--alpha", type=_alpha, help=f"length penalty, 0..{MAX_ALPHA:g} (0: captions ranked by total "
                                                "log-probability, which favours short ones; default: the model's)")


def _alpha(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_ALPHA:
        raise argparse.ArgumentTypeError(f"the length penalty's alpha must be in 0..{MAX_ALPHA:g}, got {text}")
    return value


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                          "else the SQLite store in mlflow/)")


if __name__ == "__main__":
    entry()
