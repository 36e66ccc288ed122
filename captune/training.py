"""`captune train`: one Ray Train job, its checkpoint and metrics.json, and its MLflow run."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from captune import tracking
from captune.raycluster import init_ray, require_resources, root_cause
from data.prepare import prepare_data
from trainables.checkpoint import FILENAME, read_payload
from trainables.config import TrainConfig

EXPERIMENT = "captune-train"


class TrainFailed(RuntimeError):
    """The training job failed; the message carries the worker's own error."""


@dataclass
class TrainOutcome:
    out_dir: Path
    checkpoint: Path
    metrics: dict  # what metrics.json holds
    run_id: str


def run_train(cfg: TrainConfig, data_root: str | Path, out: str | Path, *, workers: int = 1,
              use_gpu: bool = False, tracking_uri: str | None = None, experiment: str = EXPERIMENT,
              ray_address: str | None = None) -> TrainOutcome:
    import mlflow

    out = tracking.writable_folder(Path(out).resolve(), "--out")
    tracking.require_writable_store(tracking_uri)
    init_ray(ray_address)
    from trainables.ray_train import cpus_per_worker

    require_resources(workers, cpus_per_worker(workers), 1.0 if use_gpu else 0.0, ray_address)
    # Check the data and decode the images once, here, before any worker starts: a bad dataset
    # fails in seconds with the full report, and the workers find the pixel cache ready.
    data = prepare_data(data_root, cfg.image_size, cfg.cache_path(),
                        skip_bad=cfg.skip_bad, seed=cfg.split_seed)
    if data.skipped:
        print(f"--skip-bad: left out {len(data.skipped)} bad item(s):")
        for p in data.skipped:
            print(f"  {p}")
    uri = tracking.configure(tracking_uri)
    exp_id = tracking.experiment_id(experiment, uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.log_params({**tracking.flat_params("", cfg.to_dict()), "data": str(Path(data_root).resolve()),
                           "workers": workers, "gpu": use_gpu})
        mlflow.set_tags({"arch": cfg.arch, "captune.kind": "train", "image_blind": str(cfg.image_blind)})
        from trainables.ray_train import make_trainer

        trainer = make_trainer(cfg, data_root, workers=workers, use_gpu=use_gpu, name=out.name,
                               storage_path=str(out / "ray"), tracking_uri=uri, mlflow_run_id=run.info.run_id)
        try:
            result = trainer.fit()
        except Exception as e:
            mlflow.set_tag("error", root_cause(e)[:5000])
            raise TrainFailed(f"training failed: {root_cause(e)}") from e
        best = result.get_best_checkpoint("bleu4", "max") or result.checkpoint
        if best is None:
            raise TrainFailed("training reported no checkpoint")
        checkpoint = out / FILENAME
        with best.as_directory() as folder:
            shutil.copyfile(Path(folder) / FILENAME, checkpoint)
        with result.checkpoint.as_directory() as folder:  # the last epoch's holds the whole history
            history = read_payload(Path(folder) / FILENAME)["history"]
        metrics = summarize(history, read_payload(checkpoint)["epoch"])
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        mlflow.log_metrics({f"best_{k}": v for k, v in metrics["best"].items() if k.startswith("bleu")})
        mlflow.log_artifact(str(out / "metrics.json"))
        tracking.log_captioner(checkpoint)
    return TrainOutcome(out, checkpoint, metrics, run.info.run_id)


def summarize(history: list[dict], checkpoint_epoch: int) -> dict:
    """metrics.json: every epoch, the final one, and the saved checkpoint's (best bleu4)."""
    keys = ("bleu1", "bleu2", "bleu3", "bleu4")
    saved = history[checkpoint_epoch - 1]
    return {
        "epochs": history,
        "final": {"epoch": history[-1]["epoch"], **{k: history[-1][k] for k in keys}},
        "best": {"epoch": saved["epoch"], **{k: saved[k] for k in keys}},
    }
