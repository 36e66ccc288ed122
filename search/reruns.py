"""Reruns of a champion's configuration outside its search, as Ray tasks: the image-blind control
(after each search) and the seed replicates (`captune compare --seeds K`).

Each rerun has one MLflow run and one folder of checkpoints in the sweep's storage, both found
again by the rerun's key (its kind, configuration and seed). A rerun that finished before (a
resumed sweep, a repeated compare) is read back from MLflow, not trained again; one that was
stopped (Ctrl-C, SIGTERM, a killed driver) or failed goes on from its last finished epoch, in its
own run. The runs are opened and closed here, on the driver's node; the training task, which may
run on any node, writes its epochs and results through the driver's MLflow relay
(captune.infra.mlflow_relay).
"""
from __future__ import annotations

import dataclasses

import ray

from captune.infra.mlflow_logging import param_entities
from captune.infra.mlflow_names import ERROR_TAG, STOP_TAG, tags_filter
from captune.infra.raycluster import signal_name, wait_one
from captune.search.rerun_job import RerunJob
from captune.trainables.config import TrainConfig


def run_reruns(client, jobs: list[RerunJob], concurrent: int, cpus: int, gpus: float = 0.0,
               announce=None, each=None) -> list[dict]:
    """Each job's result (captune.search.rerun.rerun), at most `concurrent` training at once; finished
    ones are reused, stopped ones go on; `announce(to_train, reused)` is told how many of each before
    any trains, and `each(job, result)` each one trained as it ends. A failed rerun fails the call,
    after the others have ended."""
    jobs, results = list(jobs), [None] * len(jobs)
    task = ray.remote(_rerun).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    queue, pending, failures = [], {}, []
    try:
        for i, job in enumerate(jobs):
            done = _runs(client, job, "attributes.status = 'FINISHED'")
            if done:
                from captune.search.rerun import saved_result  # torch: only when there is one to read back

                results[i] = saved_result(client, done[0].info.run_id, job)
            else:
                jobs[i] = dataclasses.replace(job, run_id=_open_run(client, job))
                queue.append(i)
        if announce:
            announce(len(queue), len(jobs) - len(queue))
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
            else:  # (a fault of the caller's `each` is not the rerun's)
                if each:
                    each(jobs[i], results[i])
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the reruns in progress end now, recorded as stopped
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(list(pending), num_returns=len(pending), timeout=15)
        for i in [*pending.values(), *queue]:
            if jobs[i].run_id:
                _end_run(client, jobs[i].run_id, STOP_TAG, signal_name(e), "KILLED")
        raise
    if failures:
        raise failures[0]
    return results


def _rerun(job: RerunJob) -> dict:
    # In the Ray worker: torch and the training code load there, not in the process that submits.
    from captune.search.rerun import rerun

    return rerun(job)


def _runs(client, job: RerunJob, condition: str) -> list:
    return client.search_runs([job.experiment_id], filter_string=f"{tags_filter(job.tags())} and {condition}",
                              order_by=["attributes.start_time DESC"])


def _open_run(client, job: RerunJob) -> str:
    """The rerun's run: the newest one a stop or a failure left (reopened: its epochs are kept, and
    the task goes on from its last checkpoint), else a new one. Older leftovers are closed."""
    left = _runs(client, job, "attributes.status != 'FINISHED'")
    for run in left[1:]:
        _end_run(client, run.info.run_id, ERROR_TAG, "superseded by a later run of the same rerun", "KILLED")
    if left:
        run_id = left[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for tag in (STOP_TAG, ERROR_TAG):
            if tag in left[0].data.tags:
                client.delete_tag(run_id, tag)
        return run_id
    run_id = client.create_run(job.experiment_id, run_name=job.run_name, tags=job.tags()).info.run_id
    client.log_batch(run_id, params=param_entities({**TrainConfig(**job.config).to_dict(), "data": job.data_root}))
    return run_id


def _end_run(client, run_id: str, tag: str, why: str, status: str) -> None:
    client.set_tag(run_id, tag, why)
    client.set_terminated(run_id, status)
