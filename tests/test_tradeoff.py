"""Quality for speed (captune.search.tradeoff): the Pareto front and the @fast choice, on planted
models whose answers can be worked out by hand."""
import pytest

from captune.search.tradeoff import Model, choose_fast, front


def model(rank: int, score: float, ms: float, decoding: str = "tuned") -> Model:
    return Model(rank=rank, run_id=f"run{rank}", trial_id=f"t{rank}", decoding=decoding, score=score, p50_ms=ms)


def test_the_front_keeps_only_models_no_other_beats_on_both_axes():
    a, b, c, d, e = model(1, 0.60, 20.0), model(2, 0.58, 10.0), model(3, 0.55, 12.0), model(4, 0.50, 5.0), \
        model(5, 0.58, 10.0)
    # c: slower and worse than b; e: b's equal, given after it; the rest: each faster or better than the others
    assert front([a, b, c, d, e]) == [d, b, a]
    assert front([]) == []


def test_fast_is_the_fastest_model_within_reach_of_the_champion():
    champion = model(1, 0.60, 20.0)
    near_slow, near_fast, far_fastest = model(2, 0.585, 12.0), model(3, 0.571, 8.0), model(4, 0.50, 3.0)
    choice = choose_fast([champion, near_slow, near_fast, far_fastest], champion, "bleu4", within=0.03,
                         basis="the seed noise")
    assert choice.chosen == near_fast and not choice.is_champion()  # 0.571 >= 0.60 - 0.03; 0.50 is not
    words = choice.statement()
    assert "#3 at tuned" in words and "2.5x faster" in words and "-0.0290" in words and "the seed noise" in words
    # a reach of 0.01 leaves only the champion and #2 ... which is faster: #2
    assert choose_fast([champion, near_slow, near_fast], champion, "bleu4", 0.02, "--fast-within").chosen == near_slow


def test_fast_is_the_champion_when_nothing_within_reach_is_faster():
    champion = model(1, 0.60, 5.0)
    choice = choose_fast([champion, model(2, 0.59, 9.0), model(3, 0.40, 2.0)], champion, "cider", 0.05, "--fast-within")
    assert choice.is_champion()
    assert choice.statement().startswith("@fast is the champion (#1 at tuned, 5.0 ms per image)")
    # within reach but less than MIN_SPEEDUP (1.1x) faster: not known to be faster than the champion
    assert choose_fast([champion, model(2, 0.60, 4.6)], champion, "cider", 0.05, "--fast-within").is_champion()
    assert choose_fast([champion, model(2, 0.60, 4.5)], champion, "cider", 0.05, "--fast-within").chosen.rank == 2


def test_the_same_trial_greedy_can_be_fast_when_its_greedy_score_is_within_reach():
    champion, greedy_self = model(1, 0.60, 20.0, "tuned"), model(1, 0.59, 9.0, "greedy")
    choice = choose_fast([champion, greedy_self], champion, "bleu4", 0.02, "the seed noise")
    assert choice.chosen == greedy_self and not choice.is_champion()


def test_a_models_speed_is_measured_per_decoding_on_one_core_and_one_thread(tmp_path):
    import os

    import numpy as np
    import torch

    from captune.trainables.checkpoint import load_checkpoint
    from captune.trainables.decoding import Decoding
    from captune.trainables.speed import BATCH, Subject, measure, pinned
    from tests.test_serving import tiny_checkpoint

    loaded = load_checkpoint(tiny_checkpoint(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 255, (BATCH, 3, 32, 32), dtype=np.uint8)
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with pinned() as core:
        assert os.sched_getaffinity(0) == {core} and core == max(cores) and torch.get_num_threads() == 1
        decodings = {"greedy": Decoding(1), "tuned": Decoding(3, 1.0)}
        both = measure({"a": Subject(loaded, pixels, decodings), "b": Subject(loaded, pixels, decodings)})
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads  # as before
    for speed in both.values():  # (the same model twice, taking turns)
        assert speed["params"] == sum(p.numel() for p in loaded.model.parameters())
        for d in ("greedy", "tuned"):
            assert 0 < speed[f"latency_p50_ms_{d}"] <= speed[f"latency_p90_ms_{d}"]
            assert speed[f"throughput_b32_{d}"] > 0
    with pytest.raises(ValueError, match=f"measuring a's speed needs {BATCH} images, got 3"):
        measure({"a": Subject(loaded, pixels[:3], {"greedy": Decoding(1)})})


def test_a_negative_fast_within_is_refused_before_anything_starts(synth_dir):
    import argparse

    from captune.cli import _score_difference
    from captune.search.request import SweepRequest, plan
    from captune.trainables.config import ConfigError

    with pytest.raises(ConfigError, match=r"--fast-within -0.1: a validation score difference, 0 or more"):
        plan(SweepRequest(name="t", data_root=str(synth_dir), fast_within=-0.1))
    with pytest.raises(argparse.ArgumentTypeError, match="0 or more, got nan"):
        _score_difference("nan")
    assert _score_difference("0.02") == 0.02


def test_a_failed_measurement_keeps_the_sweep_and_says_why(tmp_path, tracking_uri, synth_dir, capsys):
    # An optional step: a trial whose checkpoint is gone fails its architecture's measurement; the
    # sweep's records stand, the reason is on the search's parent run and in the leaderboard.
    import mlflow
    from mlflow import MlflowClient

    from captune.cli import main
    from captune.search.speed import measure_sweep
    from captune.serving.logged_model import log_captioner
    from tests.test_serving import tiny_checkpoint

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("sw")
    parent = client.create_run(experiment_id, tags={"captune.kind": "search", "captune.sweep": "sw", "arch": "cnn-lstm"})
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=parent.info.run_id):
        version = log_captioner(tiny_checkpoint(tmp_path), registered_name="captune-cnn-lstm").registered_model_version
    client.set_tag(parent.info.run_id, "captune.champion", f"models:/captune-cnn-lstm/{version}")
    client.set_tag(parent.info.run_id, "captune.champion_promoted", "true")
    trial = client.create_run(experiment_id, tags={"captune.kind": "trial", "captune.sweep": "sw", "arch": "cnn-lstm",
                                                   "captune.trial_id": "t1", "captune.end_state": "finished",
                                                   "captune.checkpoint": str(tmp_path / "gone")})
    client.log_metric(trial.info.run_id, "best_bleu4", 0.5)
    client.log_param(trial.info.run_id, "arch", "cnn-lstm")
    lines = measure_sweep("sw", tracking_uri, str(synth_dir))  # (does not raise)
    note = client.get_run(parent.info.run_id).data.tags["captune.speed_note"]
    assert note.startswith("the cnn-lstm trials' speed not made: ") and "gone" in note
    assert "WARNING: the cnn-lstm trials' speed not made" in capsys.readouterr().out and lines == []
    assert client.get_run(trial.info.run_id).data.metrics == {"best_bleu4": 0.5}  # nothing half-written
    assert main(["leaderboard", "sw", "--tracking-uri", tracking_uri]) == 0
    assert "    speed: WARNING: the cnn-lstm trials' speed not made" in capsys.readouterr().out


def test_a_trial_whose_best_checkpoint_was_not_kept_is_left_unmeasured_not_a_failed_search(tmp_path, tracking_uri):
    # Naming each trial's checkpoint for the speed step must not cost a search its results.
    from types import SimpleNamespace

    from mlflow import MlflowClient
    from ray.tune import Checkpoint

    from captune.search.search_task import _tag_checkpoints

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("tags")
    kept, lost = (client.create_run(experiment_id, tags={"captune.trial_id": t}) for t in ("a", "b"))
    (tmp_path / "ckpt").mkdir()
    scored = {"a": SimpleNamespace(metrics={"best_epoch": 2}, best_checkpoints=[(Checkpoint(str(tmp_path / "ckpt")),
                                                                                 {"epoch": 2})]),
              "b": SimpleNamespace(metrics={"best_epoch": 2, "trial_id": "b"}, best_checkpoints=[],
                                   metrics_dataframe=None, path=str(tmp_path / "b"))}
    _tag_checkpoints(client, [client.get_run(kept.info.run_id), client.get_run(lost.info.run_id)], scored)
    assert client.get_run(kept.info.run_id).data.tags["captune.checkpoint"] == str(tmp_path / "ckpt")
    assert "captune.checkpoint" not in client.get_run(lost.info.run_id).data.tags
