"""The champion chosen over seeds. A search's best trial is partly its best configuration and
partly its luckiest seed (the winner's curse): with `--seeds K`, the search's top `--top`
configurations (its leaderboard's order, each configuration once) are each trained again with K
new seeds, the same K for each (captune.search.rerun_job.replicate_jobs: runs trained before are
reused, stopped ones go on), and the champion is the configuration with the best mean validation
score over them, in the sweep's metric; the test split is never looked at.

Each mean has a 95% interval from the seed noise pooled over the configurations (Student's t, on
K - 1 degrees of freedom per configuration: one noise, measured on every configuration). The
configurations whose interval overlaps the chosen one's are tied with it within seed noise: the
data do not tell them apart, and the statement says so. With one new seed each there is no
interval: the choice is the best single new seed, and said to be.

Runs in the search's task, after its trials and before its champion is registered, on the
sweep's trial slots. Recorded: on each retrained trial's run its new seeds' mean and interval
(`seed_mean`, `seed_mean_low`, `seed_mean_high`) and its group (`captune.seed_group`: chosen,
tied, behind); on the search's parent run the statement (`captune.seed_choice`) and the pooled
seed noise (`seed_noise`, which the convergence statement sets the regret bound against).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from captune.infra.mlflow_logging import metric_entities
from captune.infra.mlflow_names import (SEED_CHOICE_TAG, SEED_GROUP_TAG, SEED_HIGH_METRIC, SEED_LOW_METRIC,
                                        SEED_MEAN_METRIC, SEED_SUMMARY_TAG, STATE_TAG, TRIAL_TAG,
                                        trial_run_name)
from captune.search.convergence import NOISE_METRIC
from captune.search.objective import objective
from captune.search.progress import duration_text, note
from captune.search.rerun_job import replicate_jobs
from captune.search.reruns import run_reruns
from captune.search.slots import held_slot
from captune.trainables.catalog import SCORE_LABELS

LEVEL = 0.95


@dataclass
class Candidate:
    rank: int  # in the search's leaderboard (by its best trial score, on the search's seed)
    trial_id: str
    run_id: str
    name: str  # how a person reads it: "cnn-lstm lr=2.0e-03 hidden=256 vthr=2"
    score: float  # its best validation score in the search
    values: list[float] = field(default_factory=list)  # the best validation score of each new seed

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)


@dataclass
class SeedChoice:
    metric: str
    seeds: list[int]
    candidates: list[Candidate]  # in the leaderboard's order
    noise: float | None  # the seed noise: the standard deviation over seeds, pooled (None with one seed)
    half_width: float | None  # of each mean's interval (None with one seed)

    @property
    def chosen(self) -> Candidate:
        """The best mean; of equal means, the higher in the leaderboard."""
        return max(self.candidates, key=lambda c: (c.mean, -c.rank))

    @property
    def tied(self) -> list[Candidate]:
        """The others whose interval overlaps the chosen one's."""
        if self.half_width is None:
            return []
        best = self.chosen
        return [c for c in self.candidates if c is not best and c.mean + self.half_width >= best.mean - self.half_width]

    def group(self, candidate: Candidate) -> str:
        return "chosen" if candidate is self.chosen else "tied" if candidate in self.tied else "behind"

    def summary(self) -> str:
        """One clause, for the verdict: "3 configurations tied within seed noise; chosen: #2 (...)"."""
        best, tied = self.chosen, self.tied
        which = f"#{best.rank} ({best.name})"
        if self.half_width is None:
            return f"chosen over one new seed: {which}"
        if tied:
            return f"{len(tied) + 1} configurations tied within seed noise; chosen: {which}"
        return f"chosen over {len(self.seeds)} new seeds, clear of the other {len(self.candidates) - 1}: {which}"

    def statement(self) -> str:
        best, tied, label = self.chosen, self.tied, SCORE_LABELS[self.metric]
        over = f"{len(self.seeds)} new seed{'s' * (len(self.seeds) > 1)} each"
        interval = f" ± {self.half_width:.4f}" if self.half_width is not None else ""
        said = (f"chosen over {over} from the top {len(self.candidates)}: #{best.rank} ({best.name}), validation "
                f"{label} mean {best.mean:.4f}{interval}")
        if best.rank != 1:
            top = min(self.candidates, key=lambda c: c.rank)
            said += (f"; not the best single trial (#{top.rank}, {top.score:.4f} on its own seed, "
                     f"{top.mean:.4f} on average)")
        if self.half_width is None:
            return f"{said}; one new seed each measures no seed noise: `--seeds 2` or more gives intervals"
        if tied:
            return (f"{len(tied) + 1} configurations tied within seed noise ({LEVEL:.0%} intervals of their means "
                    f"overlap; noise ±{self.noise:.4f}): {', '.join(f'#{c.rank}' for c in sorted([best, *tied], key=lambda c: c.rank))}; "
                    f"{said}")
        return f"{said}, clear of the others ({LEVEL:.0%} intervals apart; seed noise ±{self.noise:.4f})"


def choose(candidates: list[Candidate], seeds: list[int], metric: str) -> SeedChoice:
    """The choice among `candidates`, each with one value per seed of `seeds`."""
    from scipy import stats

    df = sum(len(c.values) - 1 for c in candidates)
    if len(seeds) < 2 or df < 1:
        return SeedChoice(metric, seeds, candidates, None, None)
    noise = math.sqrt(sum((v - c.mean) ** 2 for c in candidates for v in c.values) / df)
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * noise / math.sqrt(len(seeds))
    return SeedChoice(metric, seeds, candidates, noise, half)


def top_configurations(ranked: list, scored: dict, top: int) -> list:
    """The first `top` trial runs of `ranked` (the leaderboard's order, only those in `scored`: Tune
    results by trial id) whose configurations differ: (rank, run, result) each."""
    seen, out = set(), []
    for rank, run in enumerate(ranked, 1):
        result = scored[run.data.tags[TRIAL_TAG]]
        key = json.dumps(result.config, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append((rank, run, result))
        if len(out) == top:
            break
    return out


def choose_over_seeds(client, job, ranked: list, scored: dict) -> SeedChoice:
    """In the search's task (`job`: its captune.search.request.SearchJob): its top configurations
    retrained over `--seeds` new seeds, the choice made and recorded."""
    req, arch, metric = job.req, job.search.arch, job.settings.metric
    candidates, jobs = [], []
    for rank, run, result in top_configurations(ranked, scored, req.top):
        trial_id = run.data.tags[TRIAL_TAG]
        candidates.append(Candidate(rank, trial_id, run.info.run_id, trial_run_name(arch, result.config),
                                    float(result.metrics[objective(metric)])))
        jobs += replicate_jobs({**job.trial_base(), **result.config}, req.seeds, f"{arch}-{trial_id}",
                               data_root=req.data_root, relay=job.relay, storage=job.root,
                               experiment_id=job.experiment_id, parent_run_id=job.parent_run_id, sweep=req.name,
                               use_gpu=req.gpus_per_worker > 0, threads=job.cpus, echo_epochs=req.verbose)
    trained, label = [], SCORE_LABELS[metric]

    def announce(to_train: int, reused: int) -> None:
        took = _trial_seconds(ranked)
        about = f", about {duration_text(took * math.ceil(to_train / slots))}" if took and to_train else ""
        note(req.name, arch, f"choosing the champion over seeds: the top {len(candidates)} configuration(s), each with "
                             f"{req.seeds} new seed(s): {to_train} run(s) to train, {slots} at a time{about}"
                             + (f"; {reused} trained before, reused" if reused else ""))

    def each(rerun, result) -> None:
        trained.append(rerun)
        note(req.name, arch, f"replicate {rerun.run_name} ({len(trained)} trained): best validation {label} "
                             f"{result['val'][objective(metric)]:.4f}")

    with held_slot(req.name, arch, "replicates", most=len(jobs)) as slots:
        results = run_reruns(client, jobs, concurrent=slots, cpus=job.cpus, gpus=req.gpus_per_worker,
                             announce=announce, each=each)
    for i, candidate in enumerate(candidates):
        mine = results[i * req.seeds:(i + 1) * req.seeds]
        candidate.values = [float(r["val"][objective(metric)]) for r in mine]
    choice = choose(candidates, [j.config["seed"] for j in jobs[:req.seeds]], metric)
    record(client, choice, job.parent_run_id)
    note(req.name, arch, choice.statement())
    return choice


def _trial_seconds(ranked: list) -> float | None:
    """How long the search's trials that trained every epoch took, on average (a replicate trains
    as long): None when none did."""
    spans = [(r.info.end_time - r.info.start_time) / 1000 for r in ranked
             if r.info.end_time and r.data.tags.get(STATE_TAG) == "finished"]
    return sum(spans) / len(spans) if spans else None


def record(client, choice: SeedChoice, parent_id: str) -> None:
    for c in choice.candidates:
        values = {SEED_MEAN_METRIC: c.mean}
        if choice.half_width is not None:
            values.update({SEED_LOW_METRIC: c.mean - choice.half_width, SEED_HIGH_METRIC: c.mean + choice.half_width})
        client.log_batch(c.run_id, metrics=metric_entities(values))
        client.set_tag(c.run_id, SEED_GROUP_TAG, choice.group(c))
    if choice.noise is not None:
        client.log_batch(parent_id, metrics=metric_entities({NOISE_METRIC: choice.noise}))
    client.set_tag(parent_id, SEED_CHOICE_TAG, choice.statement()[:5000])
    client.set_tag(parent_id, SEED_SUMMARY_TAG, choice.summary()[:5000])
