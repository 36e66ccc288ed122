"""One rerun, in a Ray worker on any node: a fixed configuration trained again outside the search
(the image-blind control of a champion, or one seed replicate of it: captune.search.rerun_job),
its best epoch scored on the test split, all recorded in the MLflow run the driver opened for it
(captune.search.reruns), through the driver's relay (captune.infra.mlflow_relay): the store is the
driver's, not this node's. It trains as every job does: `train`, its epochs through a Reporter
(captune.trainables.reporting) that keeps its checkpoints in the sweep's storage and writes its
epochs to its run.

The run keeps the best validation epoch (by its configuration's metric), as a trial and `captune
train` do, and scores that epoch on the test split with greedy search. Its latest and best
checkpoints stay in the sweep's storage while it trains, so a rerun stopped part-way goes on from
its last epoch, in the same run. It returns the test captions' per-image statistics
(captune.trainables.metrics), for the paired bootstrap, and logs the captions (`test_captions.json`) so
that a resumed sweep or compare reuses a finished rerun instead of training it again.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from captune.data.prepare import PreparedData, prepare_data
from captune.infra.mlflow_logging import EpochLogger, last_logged_epoch, metric_entities
from captune.infra.mlflow_names import ERROR_TAG, RESUMED_TAG
from captune.infra.mlflow_relay import RelayClient
from captune.search.rerun_job import RerunJob
from captune.trainables.catalog import SCORES
from captune.trainables.checkpoint import FILENAME, load_checkpoint, read_payload
from captune.trainables.config import TrainConfig, split_seed_of
from captune.trainables.evaluation import caption_split
from captune.trainables.feature_job import load_feature_set
from captune.trainables.loop import WorkerContext, train
from captune.trainables.metrics import CaptionScorer, corpus_scores
from captune.trainables.model_source import local_checkpoint
from captune.trainables.reporting import KeptCheckpoints, Reporter

CAPTIONS_ARTIFACT = "test_captions.json"


def rerun(job: RerunJob) -> dict:
    """Train (going on from the rerun's last checkpoint, if a stop left one), score the best
    epoch on the test split, record it all in the job's run. Returns {"run_id", "val": best
    epoch's validation scores ("best_epoch", "best_bleu4", ...), "test": its test scores (every
    one of SCORES), "statistics": per test image, and for `also_score` "other_test" and
    "other_statistics"}."""
    torch.set_num_threads(job.threads)
    device = torch.device("cuda" if job.use_gpu else "cpu")
    cfg = TrainConfig(**job.config).validate(f"{job.kind} run of {job.config['arch']}")
    client, run_id = RelayClient(job.relay), job.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="captune-rerun-") as keep:
            kept = KeptCheckpoints(job.checkpoints, Path(keep))
            logger = EpochLogger(client, run_id, logged=last_logged_epoch(client, run_id),
                                 where="MLflow (through the driver's relay)")
            ctx = WorkerContext(device=device, reporter=Reporter(kept=kept, mlflow=logger), resume_from=kept.latest())
            if ctx.resume_from is not None:
                payload = read_payload(ctx.resume_from / FILENAME)
                client.set_tag(run_id, RESUMED_TAG, str(payload["epoch"]))
                ctx.reporter.replay(payload["history"])  # kept, but stopped before its record was written
            if not job.echo_epochs:
                ctx.echo = lambda line: None
            data = load_feature_set(job.feature_set, cfg.cache_path()) if job.feature_set else None
            with contextlib.redirect_stdout(sys.stderr):  # progress, not output: `compare --json` stays JSON
                last = train(cfg, job.data_root, ctx, data=data)
            ctx.reporter.close(timeout=60)
            out = {"run_id": run_id, "val": _best(last), **_test(load_checkpoint(kept.best()), job, device, data)}
        out.update(_also_scored(job, client, device, data))
        client.log_batch(run_id, metrics=metric_entities({f"test_{k}": v for k, v in out["test"].items()}))
        client.log_dict(run_id, {"captions": out.pop("captions")}, CAPTIONS_ARTIFACT)
        client.set_terminated(run_id, "FINISHED")
        kept.remove()  # the run holds the result now: a rerun that finished is read back, not resumed
        return out
    except BaseException as e:  # (a stop: the driver records it, and the checkpoints stay for --resume)
        if not isinstance(e, KeyboardInterrupt):
            client.set_tag(run_id, ERROR_TAG, f"{type(e).__name__}: {e}"[:5000])
            client.set_terminated(run_id, "FAILED")
        raise


def _also_scored(job: RerunJob, client, device: torch.device, data: PreparedData | None = None) -> dict:
    """`also_score`'s test scores and statistics on the same images ({} when there is none). Its
    checkpoint comes through `client` (a RelayClient on a worker: the store is the driver's)."""
    if not job.also_score:
        return {}
    with tempfile.TemporaryDirectory(prefix="captune-champion-") as folder:
        path = Path(folder) / FILENAME
        path.write_bytes(client.fetch_file(job.also_score, FILENAME))
        other = _test(load_checkpoint(path), job, device, data)
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
    return {**out, **_also_scored(job, LocalFiles(client), device, data)}


class LocalFiles:
    """`fetch_file` for the driver's own MlflowClient (captune.infra.mlflow_relay.RelayClient has it for workers)."""

    def __init__(self, client):
        self.client = client

    def fetch_file(self, artifact_uri: str, name: str) -> bytes:
        with local_checkpoint(artifact_uri, self.client.tracking_uri) as path:  # (the driver's store)
            return path.read_bytes()
