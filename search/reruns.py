"""Reruns of a champion's configuration outside its search, as Ray tasks: the image-blind control
(after each search) and the seed replicates (`captune compare --seeds K`). A rerun that finished
before (a resumed sweep, a repeated compare) is read back from MLflow, not trained again."""
from __future__ import annotations

from dataclasses import dataclass

import ray

from infra.mlflow_names import ARCH_TAG, ERROR_TAG, KIND_TAG, SEED_TAG, SWEEP_TAG, tags_filter
from infra.raycluster import signal_name, wait_one


@dataclass(frozen=True)
class RerunJob:
    kind: str  # "control" or "replicate"
    config: dict  # TrainConfig values
    data_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    run_name: str
    also_score: str | None = None  # a model URI scored on the same test images (the champion)
    use_gpu: bool = False
    threads: int = 1
    echo_epochs: bool = True  # a line per epoch (a sweep's controls keep quiet unless --verbose)
    feature_set: str | None = None  # a manifest of shared features (trainables.feature_job): no image read

    def tags(self) -> dict[str, str]:
        return {SWEEP_TAG: self.sweep, KIND_TAG: self.kind, ARCH_TAG: self.config["arch"],
                SEED_TAG: str(self.config["seed"]), "mlflow.parentRunId": self.parent_run_id}


def run_reruns(client, jobs: list[RerunJob], concurrent: int, cpus: int, gpus: float = 0.0) -> list[dict]:
    """Each job's result (search.rerun.rerun), at most `concurrent` training at once; finished
    ones are reused. A failed rerun fails the call, after the others have ended."""
    results: list[dict | None] = [None] * len(jobs)
    queue = []
    for i, job in enumerate(jobs):
        done = _finished_run(client, job)
        if done is not None:
            from search.rerun import saved_result  # torch: only when there is one to read back

            results[i] = saved_result(client, done, job)
        else:
            _close_stale_runs(client, job)
            queue.append(i)
    task = ray.remote(_rerun).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    pending, failures = {}, []
    try:
        while queue or pending:
            while queue and len(pending) < concurrent:
                i = queue.pop(0)
                pending[task.remote(jobs[i])] = i
            ref = wait_one(list(pending))
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as e:
                failures.append(e)
                queue.clear()  # start nothing more; let the running ones end and be recorded
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the reruns in progress end now, recorded as stopped
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(list(pending), num_returns=len(pending), timeout=15)
        for i in pending.values():
            _close_stale_runs(client, jobs[i], f"stopped by {signal_name(e)}; trained again by a later run")
        raise
    if failures:
        raise failures[0]
    return results


def _rerun(job: RerunJob) -> dict:
    # In the Ray worker: torch and the training code load there, not in the process that submits.
    from search.rerun import rerun

    return rerun(job)


def _query(job: RerunJob) -> str:
    return tags_filter(job.tags())


def _finished_run(client, job: RerunJob) -> str | None:
    found = client.search_runs([job.experiment_id], filter_string=f"{_query(job)} and attributes.status = 'FINISHED'",
                               max_results=1)
    return found[0].info.run_id if found else None


def _close_stale_runs(client, job: RerunJob, why: str = "interrupted; trained again in a later run") -> None:
    """A rerun of this job left RUNNING (by a killed or stopped process) never goes on: it is
    trained anew."""
    for run in client.search_runs([job.experiment_id], filter_string=f"{_query(job)} and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, ERROR_TAG, why)
        client.set_terminated(run.info.run_id, "KILLED")

