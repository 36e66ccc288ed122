"""The per-worker training function shared by both architectures, in plain PyTorch.

`train` runs on every rank. What differs between a Ray Train worker and a plain process (rank,
device, how to wrap the model for DDP) arrives in a `WorkerContext`; where each epoch goes, in its
`Reporter` (captune.trainables.reporting), the same object for every kind of job.
"""
from __future__ import annotations

import errno
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from captune.data.batches import CaptionTable, ImageBatches
from captune.data.cache import DiskFullError
from captune.data.prepare import PreparedData, prepare_data
from captune.trainables.catalog import SCORES
from captune.trainables.checkpoint import FILENAME, CheckpointError, checkpoint_bytes, load_checkpoint, save_checkpoint
from captune.trainables.config import TrainConfig
from captune.trainables.encoders import weights_digest
from captune.trainables.features import encoder_features, weights_id
from captune.trainables.inference import generate_captions
from captune.trainables.loss import linear_cross_entropy
from captune.trainables.metrics import CaptionScorer
from captune.trainables.models import Captioner, ModelConfig, build_model, packed
from captune.trainables.reporting import Reporter


class Stopped(Exception):
    """A stop was asked for (`WorkerContext.stop_requested`) during epoch `epoch` (counted from 1)."""

    def __init__(self, epoch: int):
        super().__init__(f"stopped during epoch {epoch}")
        self.epoch = epoch


class Diverged(FloatingPointError):
    """The loss became NaN or infinite (in `epoch`, counted from 1)."""

    def __init__(self, message: str, epoch: int = 0):
        super().__init__(message)
        self.epoch = epoch


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reporter: Reporter = field(default_factory=Reporter)  # every rank's epochs (rank 0's with a checkpoint)
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    resume_from: Path | None = None  # a folder holding model.pt
    created_at: float = field(default_factory=time.perf_counter)  # to report the set-up time
    # Asked before each training step (it must be cheap): True ends training there, keeping the
    # epochs already reported. With several ranks, they agree every STOP_CHECK_STEPS steps.
    stop_requested: Callable[[], bool] = lambda: False
    # Where rank 0's line per epoch goes (a sweep's trials keep quiet: its driver shows progress).
    echo: Callable[[str], None] = lambda line: print(line, flush=True)


class TeacherForcing(nn.Module):
    """What DDP wraps: encoder (when trained), decoder and loss in one forward, so every trained
    parameter takes part in the all-reduce."""

    def __init__(self, model: Captioner, encode: bool):
        super().__init__()
        self.model, self.encode = model, encode

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor, owner: torch.Tensor,
                lengths: list[int], targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the N words to predict, `targets` (N,) (see Captioner.forward)."""
        feats = self.model.encoder(inputs) if self.encode else inputs.float()  # (B, F)
        hidden = self.model.outputs(feats[owner], captions, lengths)  # (N, H)
        return linear_cross_entropy(hidden, self.model.head.weight, self.model.head.bias, targets)


def train(cfg: TrainConfig, data_root: str | Path, ctx: WorkerContext, data: PreparedData | None = None) -> dict:
    """Train for cfg.epochs, reporting validation scores after each epoch; returns the last metrics.
    `data`: the dataset already prepared at cfg.image_size (a reused trial process keeps it)."""
    lead = ctx.rank == 0
    cache_dir = cfg.cache_path()
    if data is None:
        data = prepare_data(data_root, cfg.image_size, cache_dir, skip_bad=cfg.skip_bad, seed=cfg.split_seed,
                            progress=lead)
    vocab = data.vocabulary(cfg.vocab_threshold)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = build_model(model_config(cfg, len(vocab)))
    inputs = _encoder_inputs(model, cfg, data, cache_dir, ctx.device, lead)
    # A frozen random encoder is saved as its seed plus this digest, worked out once, not per epoch.
    encoder_digest = weights_digest(model.encoder) if lead and not (cfg.fine_tune or cfg.pretrained) else None
    if not cfg.fine_tune:
        # From here on a frozen encoder's output is `inputs`, read from the cache: drop its weights
        # (ResNet-18: 45 MB per trial; checkpoints leave a frozen encoder out anyway).
        model.encoder = nn.Identity()
    model.to(ctx.device)
    module = ctx.wrap_model(TeacherForcing(model, encode=cfg.fine_tune).to(ctx.device))
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update on the GPU, not several per parameter
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=ctx.device.type == "cuda")

    start_epoch, history = 0, []
    if ctx.resume_from is not None:
        start_epoch, history = _resume(ctx.resume_from, cfg, model, vocab, optimizer)

    train_rows = data.rows("train")
    if cfg.image_blind:  # control run: each image's captions now describe another image
        train_rows = np.random.default_rng(cfg.seed).permutation(train_rows)
    batches = ImageBatches(inputs, train_rows, CaptionTable.build(data.captions("train"), vocab, cfg.max_len),
                           cfg.batch_size, ctx.rank, ctx.world_size, shuffle=True, seed=cfg.seed)
    val_rows, val_refs = data.rows("val"), data.captions("val")
    if cfg.val_images:
        val_rows, val_refs = val_rows[:cfg.val_images], val_refs[:cfg.val_images]
    scorer = CaptionScorer(val_refs)  # the references' side of every score, once for all epochs

    metrics: dict = history[-1] if history else {}
    setup_seconds = time.perf_counter() - ctx.created_at  # from context to first step: data, model, cache
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        try:
            loss = _train_epoch(module, model, batches, optimizer, cfg, ctx, epoch)
        except Stopped as stop:  # what was reported stays; the epoch in progress is dropped
            if lead:
                ctx.echo(f"stopped during epoch {stop.epoch}/{cfg.epochs} as asked")
            return {**metrics, "stopped_in_epoch": stop.epoch}
        t1 = time.perf_counter()
        hyps = generate_captions(model, inputs, val_rows, vocab, cfg.max_len, cfg.val_beam,
                                 encode=cfg.fine_tune, device=ctx.device, rank=ctx.rank,
                                 world_size=ctx.world_size)
        metrics = {"epoch": epoch + 1, "loss": loss, **scorer.scores(hyps),
                   "epoch_seconds": t1 - t0, "val_seconds": time.perf_counter() - t1,
                   "setup_seconds": setup_seconds,
                   "vocab_size": len(vocab), "skipped_items": len(data.skipped)}
        history.append(metrics)
        metrics.update(best_so_far(history, cfg.metric))
        if lead:
            ctx.echo(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  " +
                     "  ".join(f"{k} {metrics[k]:.4f}" for k in SCORES) +
                     f"  ({metrics['epoch_seconds']:.1f}s train, {metrics['val_seconds']:.1f}s val)")
            with tempfile.TemporaryDirectory(prefix="captune-checkpoint-") as tmp:
                with _disk_full_named(f"epoch {epoch + 1}'s checkpoint", f"the temporary folder {tmp}"):
                    save_checkpoint(Path(tmp) / FILENAME, model, vocab, encoder_trained=cfg.fine_tune,
                                    encoder_digest=encoder_digest, train_config=cfg.to_dict(), epoch=epoch + 1,
                                    history=history, optimizer=optimizer.state_dict(), example=hyps[:5])
                with _disk_full_named(f"epoch {epoch + 1}'s checkpoint", "the run's storage"):
                    ctx.reporter.report(metrics, Path(tmp))
        else:
            ctx.reporter.report(metrics, None)
    return metrics


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(cfg.arch, vocab_size, cfg.encoder, cfg.pretrained, cfg.embed_size, cfg.hidden_size,
                       cfg.num_layers, cfg.dropout, encoder_seed=cfg.seed)


def checkpoint_size(cfg: TrainConfig, vocab_size: int) -> int:
    """About how many bytes each of this training's checkpoints takes."""
    return checkpoint_bytes(model_config(cfg, vocab_size), encoder_trained=cfg.fine_tune)


def best_so_far(history: list[dict], metric: str = "bleu4") -> dict:
    """The run's best epoch after these epochs, by validation `metric` (its objective), and that
    epoch's scores: {"best_epoch", "best_bleu1", ..., "best_cider", "best_rouge_l"}; so
    `best_<metric>` is the running maximum the search optimises, and the other `best_` scores
    those of the same checkpoint. On a tie the later epoch, as Ray's checkpoint managers keep the
    later of two equal checkpoints. (An epoch saved before CIDEr-D was scored lacks it: 0.)"""
    best = max(reversed(history), key=lambda h: h.get(metric, 0.0))
    return {"best_epoch": best["epoch"], **{f"best_{k}": best[k] for k in SCORES if k in best}}


@contextmanager
def _disk_full_named(what: str, where: str):
    """A full disk named as such (a Ray copy into storage says only "Error writing bytes")."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        raise DiskFullError(f"no space left on the device of {where} while writing {what} ({e}); the epochs "
                            f"before it are kept") from None


def _encoder_inputs(model: Captioner, cfg: TrainConfig, data: PreparedData, cache_dir: Path,
                    device: torch.device, progress: bool) -> np.ndarray:
    """Pixels when the encoder trains; else its features, from the shared cache."""
    if cfg.fine_tune:
        return data.pixels
    model.encoder.requires_grad_(False)  # moved to `device` only if the features are not cached yet
    return encoder_features(model.encoder, cfg.encoder, weights_id(cfg.encoder, cfg.pretrained, cfg.seed),
                            data, cache_dir, device, progress=progress)


def _train_epoch(module: nn.Module, model: Captioner, batches: ImageBatches, optimizer, cfg: TrainConfig,
                 ctx: WorkerContext, epoch: int) -> float:
    model.train()
    batches.set_epoch(epoch)
    device = ctx.device
    loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=device), 0  # over this rank's words
    for step, batch in enumerate(batches, 1):
        if _stop_agreed(ctx, step):
            raise Stopped(epoch + 1)
        # Which words to predict is worked out on the host, from the caption lengths: a boolean
        # index or a loss check on the GPU would stop the host every step until the device caught up.
        targets = packed(batch.captions[:, 1:], batch.lengths, 1).data.to(device, non_blocking=True)  # (N,)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = module(batch.inputs.to(device, non_blocking=True), batch.captions.to(device, non_blocking=True),
                          batch.image_of_caption.to(device, non_blocking=True), batch.lengths, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_sum += loss.detach().double() * len(targets)
        tokens += len(targets)
        if step % FINITE_CHECK_STEPS == 0 or step == len(batches):
            _check_finite(loss_sum, epoch, step, cfg)
    total = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if ctx.world_size > 1:
        dist.all_reduce(total)
        # DDP syncs buffers (BatchNorm statistics) at the start of each forward, so after the last
        # step they differ per rank: take rank 0's, and every rank validates the same model.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return float(total[0] / total[1].clamp(min=1))


STOP_CHECK_STEPS = 4  # several ranks must stop at the same step: they agree this often


def _stop_agreed(ctx: WorkerContext, step: int) -> bool:
    if ctx.world_size == 1:
        return ctx.stop_requested()
    if step % STOP_CHECK_STEPS:
        return False
    flag = torch.tensor([float(ctx.stop_requested())], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank asked: all stop here
    return bool(flag.item())


FINITE_CHECK_STEPS = 16  # a NaN loss stays NaN in the running sum: checking it now and then is enough


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, cfg: TrainConfig) -> None:
    if not torch.isfinite(loss_sum):
        raise Diverged(f"loss is {loss_sum.item()} at epoch {epoch + 1}, by step {step} "
                       f"(lr={cfg.lr}): training diverged", epoch=epoch + 1)


def _resume(folder: Path, cfg: TrainConfig, model: Captioner, vocab, optimizer) -> tuple[int, list]:
    loaded = load_checkpoint(folder, arch=cfg.arch)
    if loaded.vocab.words != vocab.words:
        raise CheckpointError(f"{folder}: checkpoint vocabulary differs from this run's "
                              f"(vocab_threshold or data changed); refusing to resume")
    state = loaded.model.state_dict()
    if not cfg.fine_tune:  # the frozen encoder is not in `model` (see `train`)
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    model.load_state_dict(state)
    optimizer.load_state_dict(loaded.payload["optimizer"])
    return int(loaded.payload["epoch"]), list(loaded.payload["history"])

