"""The floor beside a search: its champion's configuration trained once more with the images
shuffled against their captions (`image_blind`), for as many epochs. What the control scores,
a model scores without reading the image; a champion is worth its margin over it.

Runs in the architecture's search task, once the search has ended, on one of the sweep's trial
slots. Recorded as a run tagged `captune.kind=control` under the search's parent run, which gets
`control_bleu4` (its best validation BLEU-4, the trials' objective), `control_test_bleu4`,
`test_bleu4` (the champion's, greedy, on the same test images) and the paired bootstrap of the
champion's test BLEU-4 minus the control's (`control_gap`, `control_gap_low`, `control_gap_high`).
A champion whose interval does not lie above 0 does not clearly beat its control.
"""
from __future__ import annotations

from infra.mlflow_logging import metric_entities
from infra.mlflow_names import CONTROL_ERROR_TAG, CONTROL_METRICS, CONTROL_VERDICT_TAG, control_verdict
from infra.raycluster import root_cause
from search.bootstrap import paired_bootstrap
from search.progress import note
from search.reruns import RerunJob, run_reruns
from search.slots import held_slot


def run_control(client, job, outcome) -> dict | None:
    """`job`: the search's SearchJob; `outcome`: its ArchOutcome, with a registered champion. None
    when the control failed (its run says why)."""
    arch, parent = job.search.arch, job.parent_run_id
    done = client.get_run(parent).data
    if all(k in done.metrics for k in CONTROL_METRICS):  # a resumed sweep: the control ran before
        return {**{k: done.metrics[k] for k in CONTROL_METRICS}, "verdict": control_verdict(done.tags, done.metrics)}
    champion = outcome.champion
    config = {**job.trial_base(), **outcome.best["config"], "image_blind": True}
    rerun = RerunJob(kind="control", config=config, data_root=job.req.data_root, feature_set=job.feature_set,
                     tracking_uri=job.tracking_uri,
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
    gap = paired_bootstrap(result["other_statistics"], result["statistics"],
                           names=(f"the {arch} champion", "its image-blind control"))
    control = {"control_bleu4": result["val"]["best_bleu4"], "control_test_bleu4": result["test"]["bleu4"],
               "test_bleu4": result["other_test"]["bleu4"], "control_gap": gap.difference,
               "control_gap_low": gap.low, "control_gap_high": gap.high}
    verdict = {"clear": gap.low > 0, "text": gap.verdict()}
    client.log_batch(parent, metrics=metric_entities(control))
    client.set_tag(parent, CONTROL_VERDICT_TAG, verdict["text"])
    note(job.req.name, arch, f"control: validation BLEU-4 {control['control_bleu4']:.4f} (champion "
                             f"{outcome.best['bleu4']:.4f}); {verdict['text']}")
    return {**control, "verdict": verdict}

