"""The champion chosen over seeds (captune.search.seed_choice): the best mean over new seeds, not
the best single trial; the configurations tied with it within seed noise; one seed each measures
no noise and says so. The sweep that runs it is in tests/test_sweep.py (sweep s1, --seeds 2 --top 2)."""
import math
from types import SimpleNamespace

import pytest
from scipy import stats

from captune.search.rerun_job import replicate_jobs
from captune.search.seed_choice import Candidate, choose, top_configurations
from captune.trainables.config import TrainConfig
from tests.conftest import tiny_overrides


def candidates(*values_by_rank, scores=None) -> list[Candidate]:
    scores = scores or [0.60 - 0.01 * i for i in range(len(values_by_rank))]
    return [Candidate(rank, f"t{rank}", f"run{rank}", f"cnn-lstm #{rank}", score, list(values))
            for rank, (score, values) in enumerate(zip(scores, values_by_rank), 1)]


def test_the_best_mean_is_chosen_not_the_best_single_trial():
    # Planted: #1 is the best single trial (0.60 on the search's seed) but averages 0.51 over two
    # new seeds; #2 averages 0.565.
    choice = choose(candidates([0.50, 0.52], [0.56, 0.57], [0.40, 0.41]), [1, 2], "bleu4")
    assert choice.chosen.rank == 2 and choice.chosen.mean == pytest.approx(0.565)
    # the seed noise pooled over the three (one standard deviation, 3 degrees of freedom)
    assert choice.noise == pytest.approx(math.sqrt((2 * 0.01 ** 2 + 4 * 0.005 ** 2) / 3))
    assert choice.half_width == pytest.approx(stats.t.ppf(0.975, 3) * choice.noise / math.sqrt(2))
    assert choice.tied == [] and [choice.group(c) for c in choice.candidates] == ["behind", "chosen", "behind"]
    said = choice.statement()
    assert said.startswith("chosen over 2 new seeds each from the top 3: #2 (cnn-lstm #2), validation BLEU-4 mean "
                           f"0.5650 ± {choice.half_width:.4f}")
    assert "not the best single trial (#1, 0.6000 on its own seed, 0.5100 on average)" in said
    assert said.endswith(f"clear of the others (95% intervals apart; seed noise ±{choice.noise:.4f})")
    assert choice.summary() == "chosen over 2 new seeds, clear of the other 2: #2 (cnn-lstm #2)"


def test_configurations_whose_intervals_overlap_the_best_are_tied_with_it():
    choice = choose(candidates([0.52, 0.58], [0.54, 0.57], [0.30, 0.31]), [1, 2], "cider")
    assert choice.chosen.rank == 2  # 0.555 against 0.55
    assert [c.rank for c in choice.tied] == [1]
    assert [choice.group(c) for c in choice.candidates] == ["tied", "chosen", "behind"]
    assert choice.statement().startswith(f"2 configurations tied within seed noise (95% intervals of their means "
                                         f"overlap; noise ±{choice.noise:.4f}): #1, #2; chosen over 2 new seeds")
    assert "CIDEr-D mean 0.5550" in choice.statement()
    assert choice.summary() == "2 configurations tied within seed noise; chosen: #2 (cnn-lstm #2)"


def test_equal_means_go_to_the_higher_ranked_and_one_seed_measures_no_noise():
    assert choose(candidates([0.5, 0.6], [0.6, 0.5]), [1, 2], "bleu4").chosen.rank == 1
    one = choose(candidates([0.50], [0.55]), [1], "bleu4")
    assert one.chosen.rank == 2 and one.noise is None and one.half_width is None and one.tied == []
    assert one.statement().endswith("one new seed each measures no seed noise: `--seeds 2` or more gives intervals")
    assert one.summary() == "chosen over one new seed: #2 (cnn-lstm #2)"


def test_the_top_configurations_are_distinct_in_the_leaderboards_order():
    def run(trial):
        return SimpleNamespace(data=SimpleNamespace(tags={"captune.trial_id": trial}))

    ranked = [run("a"), run("b"), run("c"), run("d")]
    scored = {"a": SimpleNamespace(config={"lr": 1}), "b": SimpleNamespace(config={"lr": 1}),  # b repeats a
              "c": SimpleNamespace(config={"lr": 2}), "d": SimpleNamespace(config={"lr": 3})}
    assert [(rank, r.data.tags["captune.trial_id"]) for rank, r, _ in top_configurations(ranked, scored, 2)] == \
           [(1, "a"), (3, "c")]  # (their ranks in the leaderboard, repeats counted)
    assert len(top_configurations(ranked, scored, 10)) == 3


def test_replicates_of_a_configuration_are_the_same_jobs_from_a_trial_or_its_checkpoint():
    # The sweep builds them from the search's base and the trial's config; `captune compare` from the
    # registered checkpoint's train_config (TrainConfig.to_dict(), as training saves it): one key.
    base = {**TrainConfig(arch="cnn-lstm", **tiny_overrides("cnn-lstm")).to_dict(), "seed": 7, "split_seed": 5}
    fields = dict(data_root="d", experiment_id="1", parent_run_id="p", sweep="s", storage="/tmp/x")
    from_trial = replicate_jobs({**base, "lr": 0.002}, 2, "cnn-lstm-t1", **fields)
    from_checkpoint = replicate_jobs(TrainConfig(**{**base, "lr": 0.002}).to_dict(), 2, "other", **fields)
    assert [j.key for j in from_trial] == [j.key for j in from_checkpoint]
    assert [j.config["seed"] for j in from_trial] == [8, 9] and [j.run_name for j in from_trial] == \
           ["cnn-lstm-t1-seed8", "cnn-lstm-t1-seed9"]
    assert all(j.config["split_seed"] == 5 and j.kind == "replicate" for j in from_trial)  # the trial's own split
    other = replicate_jobs({**base, "lr": 0.003}, 2, "cnn-lstm-t2", **fields)
    assert [j.config["seed"] for j in other] == [8, 9] and not {j.key for j in other} & {j.key for j in from_trial}


def test_top_without_seeds_is_refused_before_anything_starts(synth_dir):
    from captune.search.request import SweepRequest, plan
    from captune.trainables.config import ConfigError

    with pytest.raises(ConfigError, match="--top 2: it says how many configurations are retrained over new seeds"):
        plan(SweepRequest(name="t", data_root=str(synth_dir), top=2))
    plan(SweepRequest(name="t", data_root=str(synth_dir), top=2, seeds=2))
    plan(SweepRequest(name="t", data_root=str(synth_dir), top=2, resume=True))  # (the sweep's seeds are read then)


def test_a_choice_whose_replicates_fail_leaves_the_top_trial_and_says_why(monkeypatch, tracking_uri):
    # An optional step: the search's results stand (its top trial is registered), the reason is on
    # the parent run and in the console, and `--resume` tries again. A store that does not answer
    # is not swallowed: the search says how to go on once it answers.
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from captune.search import search_task

    client = MlflowClient(tracking_uri)
    parent = client.create_run(client.create_experiment("c1")).info.run_id
    job = SimpleNamespace(parent_run_id=parent, req=SimpleNamespace(name="c1"), search=SimpleNamespace(arch="cnn-lstm"))
    said = []
    monkeypatch.setattr(search_task, "note", lambda sweep, arch, text: said.append(text))

    def fails(*args):
        raise RuntimeError("replicate cnn-lstm-t1-seed1 ran out of memory")

    monkeypatch.setattr("captune.search.seed_choice.choose_over_seeds", fails)
    assert search_task._choice(client, job, [], {}) is None
    assert client.get_run(parent).data.tags["captune.seed_choice_error"] == "replicate cnn-lstm-t1-seed1 ran out of memory"
    assert said == ["WARNING: the choice over seeds failed (replicate cnn-lstm-t1-seed1 ran out of memory); the top "
                    "trial is the champion. `captune sweep --resume` tries again."]

    def unreachable(*args):
        raise MlflowException("API request to http://127.0.0.1:5000 failed: Connection refused")

    monkeypatch.setattr("captune.search.seed_choice.choose_over_seeds", unreachable)
    with pytest.raises(MlflowException):
        search_task._choice(client, job, [], {})
