"""One rerun, in a Ray worker: a fixed configuration trained again outside the search (the
image-blind control of a champion, or one seed replicate of it), its best epoch scored on the
test split, all recorded as an MLflow run under the architecture's search run.

The run keeps the best validation epoch (by its configuration's metric), as a trial and `captune
train` do, and scores that epoch on the test split with greedy search. It returns the test
captions' per-image statistics (trainables.metrics), for the paired bootstrap, and logs the
captions (`test_captions.json`) so that a resumed sweep or compare reuses a finished rerun
instead of training it again.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from data.prepare import PreparedData, prepare_data
from infra.mlflow_logging import EpochLogger, metric_entities, param_entities
from infra.mlflow_names import ERROR_TAG
from search.reruns import RerunJob
from trainables.catalog import SCORES
from trainables.checkpoint import FILENAME, load_checkpoint
from trainables.config import TrainConfig, split_seed_of
from trainables.evaluation import caption_split
from trainables.feature_job import load_feature_set
from trainables.loop import WorkerContext, train
from trainables.metrics import CaptionScorer, corpus_scores
from trainables.model_source import load_captioner

CAPTIONS_ARTIFACT = "test_captions.json"


def rerun(job: RerunJob) -> dict:
    """Train, score the best epoch on the test split, record. Returns {"run_id", "val": best
    epoch's validation scores ("best_epoch", "best_bleu4", ...), "test": its test scores (every
    one of SCORES), "statistics": per test image, and for `also_score` "other_test" and
    "other_statistics"}."""
    torch.set_num_threads(job.threads)
    device = torch.device("cuda" if job.use_gpu else "cpu")
    cfg = TrainConfig(**job.config).validate(f"{job.kind} run of {job.config['arch']}")
    client = MlflowClient(job.tracking_uri)
    run = client.create_run(job.experiment_id, run_name=job.run_name, tags=job.tags())
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=param_entities({**cfg.to_dict(), "data": job.data_root}))
        logger = EpochLogger(job.tracking_uri, run_id)
        with tempfile.TemporaryDirectory(prefix="captune-rerun-") as keep:
            best = Path(keep) / FILENAME

            def report(metrics: dict, checkpoint_dir: Path | None) -> None:
                logger.log(metrics)
                if checkpoint_dir is not None and metrics["best_epoch"] == metrics["epoch"]:
                    shutil.copyfile(checkpoint_dir / FILENAME, best)

            ctx = WorkerContext(device=device, report=report)
            if not job.echo_epochs:
                ctx.echo = lambda line: None
            data = load_feature_set(job.feature_set, cfg.cache_path()) if job.feature_set else None
            with contextlib.redirect_stdout(sys.stderr):  # progress, not output: `compare --json` stays JSON
                last = train(cfg, job.data_root, ctx, data=data)
            out = {"run_id": run_id, "val": _best(last), **_test(load_checkpoint(best), job, device, data)}
        out.update(_also_scored(job, device, data))
        client.log_batch(run_id, metrics=metric_entities({f"test_{k}": v for k, v in out["test"].items()}))
        client.log_dict(run_id, {"captions": out.pop("captions")}, CAPTIONS_ARTIFACT)
        client.set_terminated(run_id, "FINISHED")
        return out
    except BaseException as e:
        client.set_tag(run_id, ERROR_TAG, f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _also_scored(job: RerunJob, device: torch.device, data: PreparedData | None = None) -> dict:
    """`also_score`'s test scores and statistics on the same images ({} when there is none)."""
    if not job.also_score:
        return {}
    other = _test(load_captioner(job.also_score, job.tracking_uri), job, device, data)
    return {"other_test": other["test"], "other_statistics": other["statistics"]}


def _test(loaded, job: RerunJob, device: torch.device, data: PreparedData | None = None) -> dict:
    skip_bad = bool(loaded.payload.get("train_config", {}).get("skip_bad", False))
    cache_dir = TrainConfig(**job.config).cache_path() if job.feature_set else None
    captions, refs = caption_split(loaded, job.data_root, "test", (1,), cache_dir=cache_dir, skip_bad=skip_bad,
                                   device=device, data=data)
    return {**_scored(captions[1], refs), "captions": captions[1]}


def _scored(captions: list[str], refs: list[list[str]]) -> dict:
    statistics = CaptionScorer(refs).statistics(captions)
    return {"test": corpus_scores(statistics), "statistics": statistics.tolist()}


def _best(metrics: dict) -> dict:
    """The best epoch's validation scores, as the training loop reports them."""
    return {k: metrics[k] for k in ("best_epoch", *(f"best_{s}" for s in SCORES)) if k in metrics}


def saved_result(client, run_id: str, job: RerunJob) -> dict:
    """A finished rerun's result, read back from its run: its logged test captions are scored
    again against the references (statistics are not stored, captions are: a run recorded before
    CIDEr-D gets it so); `also_score` is scored afresh."""
    m = client.get_run(run_id).data.metrics
    with tempfile.TemporaryDirectory(prefix="captune-rerun-") as folder:
        local = client.download_artifacts(run_id, CAPTIONS_ARTIFACT, folder)
        captions = json.loads(Path(local).read_text())["captions"]
    cfg = TrainConfig(**job.config)
    data = load_feature_set(job.feature_set, cfg.cache_path()) if job.feature_set else prepare_data(
        job.data_root, cfg.image_size, cfg.cache_path(), skip_bad=cfg.skip_bad, seed=split_seed_of(job.config),
        progress=False)
    out = {"run_id": run_id, "val": _best(m), **_scored(captions, data.captions("test"))}
    device = torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")
    return {**out, **_also_scored(job, device, data)}
