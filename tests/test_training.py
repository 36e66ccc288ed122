import json
from pathlib import Path

import pytest
import torch

from captune.trainables.checkpoint import read_payload
from captune.trainables.config import compose
from captune.trainables.reporting import Reporter
from captune.trainables.loop import WorkerContext, train
from tests.conftest import tiny_overrides


def _cfg(arch, **more):
    return compose(arch, [("test", tiny_overrides(arch, **more))])


@pytest.mark.parametrize("arch,fine_tune", [("cnn-lstm", True), ("resnet-gru", False)])
def test_plain_pytorch_training_reports_every_epoch_and_resumes(arch, fine_tune, synth_dir, tmp_path):
    reports = []

    def report(metrics, folder):
        saved = tmp_path / f"epoch{metrics['epoch']}"
        saved.mkdir()
        (saved / "model.pt").write_bytes((folder / "model.pt").read_bytes())
        reports.append(metrics)

    cfg = _cfg(arch, fine_tune=fine_tune, epochs=1)
    last = train(cfg, synth_dir, WorkerContext(reporter=Reporter(sink=report)))
    assert [m["epoch"] for m in reports] == [1]
    assert {"loss", "bleu1", "bleu2", "bleu3", "bleu4"} <= set(last) and 0 <= last["bleu4"] <= 1
    # a resumed run goes on from the saved epoch, with the saved history
    cfg2 = _cfg(arch, fine_tune=fine_tune, epochs=2)
    last = train(cfg2, synth_dir, WorkerContext(reporter=Reporter(sink=report), resume_from=tmp_path / "epoch1"))
    assert [m["epoch"] for m in reports] == [1, 2] and last["epoch"] == 2
    history = read_payload(tmp_path / "epoch2" / "model.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == reports[0]


@pytest.mark.parametrize("arch,fine_tune", [("cnn-lstm", True), ("resnet-gru", False)])
def test_same_configuration_and_seed_give_the_same_validation_bleu_on_cpu(arch, fine_tune, synth_dir):
    # what makes a seed replicate's spread the seed's, not noise: everything else is deterministic
    def run(seed):
        histories = []
        train(_cfg(arch, fine_tune=fine_tune, epochs=2, seed=seed), synth_dir,
              WorkerContext(reporter=Reporter(sink=lambda m, folder: histories.append(m))))
        return [(round(m["loss"], 6), round(m["bleu4"], 4), round(m["bleu1"], 4)) for m in histories]

    first = run(seed=0)
    assert run(seed=0) == first
    assert run(seed=1) != first  # the seed does reach the model (init, batch order, dropout)


def _ddp_loop(config):
    """Runs the real training function under Ray Train; records what each rank ends with."""
    import ray.train
    import ray.train.torch

    from captune.trainables.config import TrainConfig

    holder = {}

    def wrap(module):
        holder["module"] = module
        return ray.train.torch.prepare_model(module)

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seen = []
    train(TrainConfig(**config["train"]), config["data_root"],
          WorkerContext(rank=rank, world_size=ctx.get_world_size(), device=torch.device("cpu"),
                        reporter=Reporter(sink=lambda m, folder: (seen.append(m), ray.train.report(m))), wrap_model=wrap))
    model = holder["module"].model
    state = {k: v.double().sum().item() for k, v in model.state_dict().items() if v.is_floating_point()}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"state": state, "metrics": seen}))


@pytest.mark.parametrize("fine_tune", [True, False], ids=["fine-tuned", "frozen"])
def test_two_worker_ddp_on_cpu_keeps_ranks_identical(ray_cluster, synth_dir, tmp_path, fine_tune):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # frozen: each rank trains on cached features, its encoder dropped (captune.trainables.loop.train)
    cfg = _cfg("cnn-lstm", fine_tune=fine_tune, epochs=1, batch_size=8)
    trainer = TorchTrainer(
        _ddp_loop,
        train_loop_config={"train": cfg.to_dict(), "data_root": str(synth_dir), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ddp"),
    )
    trainer.fit()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["state"].keys() == r1["state"].keys() and len(r0["state"]) > 10
    for key in r0["state"]:
        assert r0["state"][key] == pytest.approx(r1["state"][key], rel=1e-6, abs=1e-6), key
    # every rank reports the same metrics (loss all-reduced, BLEU on the gathered captions)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in ms]  # noqa: E731
    assert strip(r0["metrics"]) == strip(r1["metrics"])


def test_batches_hold_every_caption_of_their_images_longest_first():
    import numpy as np

    from captune.data.batches import CaptionTable, ImageBatches
    from captune.data.vocab import Vocabulary

    captions = [["a b", "a b c d"], ["c"], ["d d d", "a", "b c"]]
    vocab = Vocabulary.build([c.split() for caps in captions for c in caps], min_count=1)
    table = CaptionTable.build(captions, vocab, max_len=10)
    features = np.arange(6, dtype=np.float32).reshape(3, 2)  # one row per image
    (batch,) = ImageBatches(features, np.arange(3), table, batch_size=3, shuffle=False)
    assert batch.lengths == sorted(batch.lengths, reverse=True)  # what the packed decoder needs
    assert batch.lengths == (batch.captions != vocab.pad_id).sum(1).tolist()
    assert batch.captions.shape[1] == max(batch.lengths)  # no all-padding columns
    owners = [int(batch.inputs[i, 0]) // 2 for i in batch.image_of_caption]  # the image each caption is on
    pairs = sorted((image, vocab.to_text(ids)) for image, ids in zip(owners, batch.captions.tolist()))
    assert pairs == sorted((image, c) for image, caps in enumerate(captions) for c in caps)


@pytest.mark.parametrize("chunk_elements", [3 * 7, 2**21], ids=["chunked", "one-chunk"])
def test_chunked_loss_equals_cross_entropy_of_the_logits(monkeypatch, chunk_elements):
    from captune.trainables import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", chunk_elements)  # 3 rows of 7 logits at a time
    torch.manual_seed(0)
    hidden = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (10,))
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets)
    got = loss.linear_cross_entropy(hidden, weight, bias, targets)
    assert torch.allclose(got, expected)
    # the gradients, scaled as the loss is (here by 3)
    for a, b in zip(torch.autograd.grad(3 * expected, (hidden, weight, bias)),
                    torch.autograd.grad(3 * got, (hidden, weight, bias))):
        assert torch.allclose(a, b)


def test_the_reporter_keeps_each_checkpoint_before_mlflow_records_its_epoch_once(synth_dir, tmp_path, new_store):
    # The path of a control or a replicate (no Ray here): checkpoints kept in storage, epochs to a real
    # MLflow store under mlflow_epoch's names; a resume replays what it kept without recording it twice.
    from mlflow import MlflowClient

    from captune.infra.mlflow_logging import EpochLogger
    from captune.trainables.reporting import KeptCheckpoints, mlflow_epoch

    client = MlflowClient(new_store(tmp_path / "mlflow.db"))
    run_id = client.create_run(client.create_experiment("reporter")).info.run_id
    kept = KeptCheckpoints(str(tmp_path / "kept"), tmp_path)
    order = []

    class Watched(EpochLogger):
        def log(self, step, values):
            if step > self.queued:  # (not again: a replayed epoch the run holds)
                order.append(("logged", step, read_payload(kept.latest() / "model.pt")["epoch"]))
            super().log(step, values)

    reporter = Reporter(kept=kept, mlflow=Watched(client, run_id))
    train(_cfg("cnn-lstm", epochs=2), synth_dir, WorkerContext(reporter=reporter, echo=lambda line: None))
    history = read_payload(kept.latest() / "model.pt")["history"]
    reporter.replay(history)  # as a resume does: both epochs are in the run already
    reporter.close(timeout=30)
    assert order == [("logged", 1, 1), ("logged", 2, 2)]  # each epoch's checkpoint kept before it was logged
    metrics = client.get_run(run_id).data.metrics
    assert set(metrics) == set(mlflow_epoch(history[0], first=True))
    for key in ("bleu4", "best_cider", "loss"):
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == \
               [(h["epoch"], pytest.approx(h[key])) for h in history]
    assert [m.step for m in client.get_metric_history(run_id, "vocab_size")] == [1]
    best = read_payload(kept.best())
    assert best["epoch"] == history[-1]["best_epoch"]
