"""A search's Tune runs, its parts: the first (part 0), then one per `captune sweep --resume
--more-trials N` (part k, `NAME-ARCH-more<k>`), each beside the others in the sweep's storage and
all sharing the search's Optuna study (captune.search.search_task loads it; the sampler is told
every earlier trial). A plain `--resume` goes on with the latest part; the search's champion,
ranks and analysis cover every part."""
from __future__ import annotations

from ray import tune

from captune.infra.mlflow_names import ADDED_TRIALS_TAG, ARCH_TAG, ERROR_TAG, KIND_TAG, STATE_TAG, SWEEP_TAG
from captune.search.request import SearchJob, SweepExists, SweepRequest, resume_command, tune_name
from captune.search.space import SweepSettings


def last_part(root: str, sweep: str, arch: str) -> int:
    """The latest Tune run of a search on disk: 0 its first, k its k-th `--more-trials`; -1 none."""
    part = -1
    while tune.Tuner.can_restore(f"{root}/{tune_name(sweep, arch, part + 1)}"):
        part += 1
    return part


def search_part(client, req: SweepRequest, settings: SweepSettings, root: str, arch: str,
                parent_id: str) -> tuple[int, bool, int]:
    """(part, restore, trials) of a search's Tune run now: its latest, restored if there is one,
    or with --more-trials a new one after it (the search's trials added, counted on its parent)."""
    last = last_part(root, req.name, arch)
    if not (req.more_trials and last >= 0):
        return max(last, 0), last >= 0, settings.trials  # (a restored run's own count is in Tune's snapshot)
    added = int(client.get_run(parent_id).data.tags.get(ADDED_TRIALS_TAG, "0")) + req.more_trials
    client.set_tag(parent_id, ADDED_TRIALS_TAG, str(added))
    return last + 1, False, req.more_trials


def require_finished_searches(req: SweepRequest, parents: list, archs: list[str]) -> None:
    """--more-trials grows finished searches only: one stopped part-way is finished by a plain
    --resume first (which the refusal names)."""
    if not req.more_trials:
        return
    unfinished = [p.data.tags.get(ARCH_TAG, "?") for p in parents if p.data.tags.get(ARCH_TAG) in archs and not (
        p.info.status == "FINISHED" or (p.info.status == "FAILED" and ERROR_TAG not in p.data.tags))]
    if unfinished:
        plain = SweepRequest(**{**vars(req), "more_trials": 0})
        raise SweepExists(f"--more-trials adds trials to a finished search, and the {' and '.join(unfinished)} "
                          f"search of sweep {req.name!r} has not finished: first `{resume_command(plain)}`, "
                          f"then add trials")


def planned_trials(client, job: SearchJob) -> int:
    """A search's trials in all, as the sweep's view counts them: those ended before and this
    part's, when it grows the search (its first run may have been cut short by a time budget);
    else the first run's and every added one."""
    if job.part and not job.restore:
        ended = client.search_runs([job.experiment_id], max_results=10000, filter_string=(
            f"tags.`{SWEEP_TAG}` = '{job.req.name}' and tags.`{KIND_TAG}` = 'trial' and "
            f"tags.`{ARCH_TAG}` = '{job.search.arch}' and tags.`{STATE_TAG}` != 'interrupted'"))
        return len(ended) + job.trials
    added = client.get_run(job.parent_run_id).data.tags.get(ADDED_TRIALS_TAG, "0")
    return job.settings.trials + int(added)


def earlier_results(job: SearchJob, trainable) -> list:
    """The Tune results of the search's parts before `job.part`."""
    return [result for part in range(job.part)
            for result in tune.Tuner.restore(f"{job.root}/{tune_name(job.req.name, job.search.arch, part)}",
                                             trainable=trainable).get_results()]
