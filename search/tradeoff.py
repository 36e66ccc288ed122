"""Quality for speed: per architecture, which trials are on the Pareto front of the validation
score against latency, and which model is `@fast`. A model here is a trial's best checkpoint at a
decoding: greedy (the decoding its validation score was measured at in training, the objective)
or the architecture's tuned decoding (the champion's, captune.search.decoding_search; each trial
scored at it on the validation split by captune.search.speed).

`@fast` is the model of lowest batch-1 latency (p50) whose validation score is within `within` of
the champion's, at the decoding the champion serves: by default the seed noise (the standard
deviation over seeds, pooled: captune.search.seed_choice), else `--fast-within`; and faster than
the champion by more than two measurements of one model differ (MIN_SPEEDUP). The champion
itself when nothing within reach is faster."""
from __future__ import annotations

import re
from dataclasses import dataclass

from captune.trainables.catalog import CAPTION_BEAM, SCORE_LABELS
from captune.trainables.decoding import Decoding

DECODINGS = ("greedy", "tuned")
# Two measurements of one model's p50 on one idle machine differ by up to ~10 % (RESULTS.md): a
# model less than that faster than the champion is not known to be faster.
MIN_SPEEDUP = 1.1


@dataclass(frozen=True)
class Model:
    """One trial's best checkpoint at one decoding, as measured."""
    rank: int  # the trial's leaderboard rank in its architecture
    run_id: str
    trial_id: str
    decoding: str  # "greedy" or "tuned"
    score: float  # validation score in the sweep's metric at that decoding
    p50_ms: float  # batch-1 latency, median
    name: str = ""  # the trial's run name, for people

    def label(self) -> str:
        return f"#{self.rank} at {self.decoding}"

    def configuration(self) -> str:
        """Its run's name less the rank ("cnn-lstm lr=2.0e-03 hidden=256 vthr=2")."""
        return re.sub(r"^#\d+ ", "", self.name)


def front(models: list[Model]) -> list[Model]:
    """The models no other beats on both axes (as fast or faster and at least as good, better on
    one), fastest first; of equal ones, the first given."""
    kept: list[Model] = []
    for m in sorted(models, key=lambda m: (m.p50_ms, -m.score)):
        if not kept or m.score > kept[-1].score:
            kept.append(m)
    return kept


@dataclass
class FastChoice:
    metric: str
    chosen: Model
    champion: Model
    within: float
    basis: str  # what `within` is: "the seed noise" or "--fast-within"

    def is_champion(self) -> bool:
        return (self.chosen.run_id, self.chosen.decoding) == (self.champion.run_id, self.champion.decoding)

    def statement(self) -> str:
        label, c, f = SCORE_LABELS[self.metric], self.champion, self.chosen
        reach = f"within {self.within:.4f} ({self.basis}) of the champion's {c.score:.4f}"
        if self.is_champion():
            return (f"@fast is the champion ({c.label()}, {c.p50_ms:.1f} ms per image): no model {reach} validation "
                    f"{label} is {MIN_SPEEDUP:g}x as fast or faster")
        return (f"@fast: {f.label()} ({f.configuration()}), {f.p50_ms:.1f} ms per image, {c.p50_ms / f.p50_ms:.1f}x faster "
                f"than the champion ({c.label()}, {c.p50_ms:.1f} ms); validation {label} {f.score:.4f}, "
                f"{f.score - c.score:+.4f}, {reach}")


def choose_fast(models: list[Model], champion: Model, metric: str, within: float, basis: str) -> FastChoice:
    """The fastest model scoring at least the champion's score less `within`; of equal speed, the
    better scoring; the champion if none is MIN_SPEEDUP times as fast."""
    reach = [m for m in models if m.score >= champion.score - within and m.p50_ms * MIN_SPEEDUP <= champion.p50_ms]
    chosen = min(reach, key=lambda m: (m.p50_ms, -m.score)) if reach else champion
    return FastChoice(metric, chosen, champion, within, basis)


def draw_fronts(points: dict[str, list[Model]], champions: dict[str, Model], fast: dict[str, FastChoice],
                metric: str, path) -> None:
    """pareto.png: per architecture (a row) and decoding (a column), every measured model's
    validation score against its batch-1 latency, the front joined, the champion and @fast marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(points)
    fig, axes = plt.subplots(len(archs), 2, figsize=(11, 3.8 * len(archs)), squeeze=False)
    for row, arch in enumerate(archs):
        for col, decoding in enumerate(DECODINGS):
            ax, here = axes[row][col], [m for m in points[arch] if m.decoding == decoding]
            ax.scatter([m.p50_ms for m in here], [m.score for m in here], color="0.55", s=22, label="trial")
            edge = front(here)
            ax.step([m.p50_ms for m in edge], [m.score for m in edge], where="post", color="C0", marker="o",
                    label="Pareto front")
            for m in here:
                ax.annotate(f"#{m.rank}", (m.p50_ms, m.score), fontsize=8, xytext=(4, 3), textcoords="offset points")
            c = champions.get(arch)
            if c and c.decoding == decoding:
                ax.scatter([c.p50_ms], [c.score], marker="*", s=220, color="C3", zorder=3, label="champion")
            f = fast.get(arch)
            if f and f.chosen.decoding == decoding:
                ax.scatter([f.chosen.p50_ms], [f.chosen.score], s=160, facecolors="none", edgecolors="C2",
                           linewidths=2, zorder=4, label="@fast")
            ax.set(title=f"{arch}, {decoding} decoding", xlabel="latency per image, batch 1, p50 (ms)",
                   ylabel=f"validation {SCORE_LABELS[metric]}")
            ax.set_xlim(left=0)  # (from 0: a 2 % difference in speed looks like one)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")  # (the points lie right: the axis starts at 0)
    fig.suptitle("quality for speed: up and to the left is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def served(entry: dict) -> dict:
    """A champion's scores in captune compare's results at the decoding it serves: its tuned one,
    else beam CAPTION_BEAM, how a model without one captions; with that decoding in words."""
    return entry.get("tuned") or {"decoding": Decoding(CAPTION_BEAM).text(), **entry.get(f"beam{CAPTION_BEAM}", {})}


def alias_lines(models: dict, archs: list[str], metric: str, col) -> list[str]:
    """captune compare's rows: @champion and @fast on the split, each at the decoding it serves, with
    its latency per image. `models`: compare's results per architecture; `col`: a row's cells."""
    fast = {a: models[a].get("fast") for a in archs}
    label = SCORE_LABELS[metric]
    lines = ["@champion and @fast (each at its own decoding; latency per image, batch 1, p50, one core):"]
    champion = {a: served(models[a]) for a in archs}
    lines.append(f"{'@champion ' + label:<18}" + col(f"{champion[a][metric]:.4f}" for a in archs))
    lines.append(f"{'  ms per image':<18}" + col(_ms((fast[a] or {}).get("champion_latency_p50_ms")) for a in archs))
    lines.append(f"{'@fast ' + label:<18}" + col(f"{fast[a][metric]:.4f}" if fast[a] else "-" for a in archs))
    lines.append(f"{'  ms per image':<18}" + col(_ms((fast[a] or {}).get("latency_p50_ms")) for a in archs))
    lines.append(f"{'  model':<18}" + col(("= @champion" if fast[a]["same"] else f"v{fast[a]['version']}")
                                          if fast[a] else "not chosen" for a in archs))
    lines.append("@fast decoding: " + "; ".join(f"{a} {fast[a]['decoding']}" for a in archs if fast[a]))
    return lines


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"
