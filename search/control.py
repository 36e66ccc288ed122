"""The floor beside a search: its champion's configuration trained once more with the images
shuffled against their captions (`image_blind`), for as many epochs. What the control scores,
a model scores without reading the image; a champion is worth its margin over it.

Runs in the architecture's search task, once the search has ended, on one of the sweep's trial
slots. Recorded as a run tagged `captune.kind=control` under the search's parent run, which gets,
in BLEU-4 and in CIDEr-D (captune.infra.mlflow_names.control_metrics): the control's best validation score
(`control_bleu4`), its test score (`control_test_bleu4`), the champion's (`test_bleu4`, greedy, on
the same test images) and the paired bootstrap of the champion's test score minus the control's
(`control_gap`, `control_gap_low`, `control_gap_high`; `control_cider_gap`, ...). The control
trains as the trials did, its best epoch picked by the sweep's metric; a champion whose interval
in that metric does not lie above 0 does not clearly beat its control.
"""
from __future__ import annotations

from captune.infra.mlflow_logging import metric_entities
from captune.infra.mlflow_names import (CONTROL_ERROR_TAG, CONTROL_FIELDS, CONTROL_VERDICT_TAG, CONTROLLED, control_metrics,
                                control_record)
from captune.infra.raycluster import root_cause
from captune.search.bootstrap import paired_bootstrap
from captune.search.progress import note
from captune.search.rerun_job import RerunJob
from captune.search.reruns import run_reruns
from captune.search.slots import held_slot
from captune.trainables.catalog import SCORE_LABELS


def run_control(client, job, outcome) -> dict | None:
    """`job`: the search's SearchJob; `outcome`: its ArchOutcome, with a registered champion. None
    when the control failed (its run says why)."""
    arch, parent, metric = job.search.arch, job.parent_run_id, job.settings.metric
    done = client.get_run(parent).data
    before = control_record(done.tags, done.metrics, metric)
    if before and set(before["scores"]) == set(CONTROLLED):  # a resumed sweep: the control ran before
        return before
    champion = outcome.champion
    config = {**job.trial_base(), **outcome.best["config"], "image_blind": True}
    rerun = RerunJob(kind="control", config=config, data_root=job.req.data_root, feature_set=job.feature_set,
                     relay=job.relay, storage=job.root,
                     experiment_id=job.experiment_id, parent_run_id=parent, sweep=job.req.name,
                     run_name=f"{arch}-control", also_score=f"models:/{champion['name']}/{champion['version']}",
                     use_gpu=job.req.gpus_per_worker > 0, threads=job.cpus, echo_epochs=job.req.verbose)
    note(job.req.name, arch, f"control: the champion's configuration, image-blind, {config['epochs']} epochs")
    try:
        with held_slot(job.req.name, arch, "control"):
            [result] = run_reruns(client, [rerun], concurrent=1, cpus=job.cpus, gpus=job.req.gpus_per_worker)
    except Exception as e:  # the search's results stand; the missing floor is recorded and shown
        reason = root_cause(e)
        client.set_tag(parent, CONTROL_ERROR_TAG, reason[:5000])
        note(job.req.name, arch, f"WARNING: the image-blind control failed ({reason}); the champion has no floor. "
                                 f"`captune sweep --resume` tries it again.")
        return None
    scores, gaps = {}, {}
    for score in CONTROLLED:
        gaps[score] = paired_bootstrap(result["other_statistics"], result["statistics"], metric=score,
                                       names=(f"the {arch} champion", "its image-blind control"))
        values = (result["val"].get(f"best_{score}", float("nan")),  # (nan: a rerun recorded before CIDEr-D)
                  result["test"][score], result["other_test"][score],
                  gaps[score].difference, gaps[score].low, gaps[score].high)
        scores[score] = dict(zip(CONTROL_FIELDS, values))
    verdict = {"clear": gaps[metric].low > 0, "text": gaps[metric].verdict()}
    client.log_batch(parent, metrics=metric_entities({name: scores[s][field] for s in CONTROLLED for field, name
                                                      in zip(CONTROL_FIELDS, control_metrics(s))}))
    client.set_tag(parent, CONTROL_VERDICT_TAG, verdict["text"])
    note(job.req.name, arch, f"control: validation {SCORE_LABELS[metric]} {scores[metric]['control']:.4f} (champion "
                             f"{outcome.best['score']:.4f}); {verdict['text']}")
    return {"metric": metric, "scores": scores, "verdict": verdict}

