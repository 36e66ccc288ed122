"""The figures of a replay (benchmarks/search_replay.py): a table per architecture and W, and the
plot of the anytime best validation score against simulated time.

    python benchmarks/replay_report.py benchmarks/curves/replay-bleu4.json
    python benchmarks/replay_report.py A.json B.json OUT.json        # replays run apart, merged
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

BASELINE = "random (full training)"
PLOTTED = 8  # strategies drawn in the plot: the baseline, then the fastest


def median_time(times: list[float]) -> float:
    """The median of times where a search that never reached the target counts as later than all."""
    return float(np.median(np.array(times)))  # inf sorts last: the median is inf when half never reach it


def quartiles(times: list[float]) -> tuple[float, float]:
    # "nearest": a quartile among searches that never reached the target is "never", not nan
    return float(np.percentile(times, 25, method="nearest")), float(np.percentile(times, 75, method="nearest"))


def fmt_s(t: float) -> str:
    return "never" if math.isinf(t) else f"{t:.0f}"


def fmt_ratio(r: float) -> str:
    return "—" if math.isnan(r) else "never" if math.isinf(r) else f"{r:.2f}"


def rows_for(runs: list[dict], arch: str, workers: int) -> list[dict]:
    by = defaultdict(list)
    for r in runs:
        if r["arch"] == arch and r["workers"] == workers:
            by[r["strategy"]].append(r)
    out = []
    for name, rs in by.items():
        times = [r["times"][0] for r in rs]
        tests = [r["pick_test"] for r in rs if r["pick_test"] is not None]
        vals = [r["pick_val"] for r in rs if r["pick_val"] is not None]
        out.append({"strategy": name, "median": median_time(times), "q": quartiles(times),
                    "reached": sum(math.isfinite(t) for t in times), "seeds": len(rs),
                    "pick_val": float(np.median(vals)) if vals else math.nan,
                    "pick_test": float(np.median(tests)) if tests else math.nan,
                    "trials": float(np.median([r["trials"] for r in rs])),
                    "anytime": np.array([r["anytime"] for r in rs])})
    base = next((o["median"] for o in out if o["strategy"] == BASELINE), math.nan)
    for o in out:
        # random search never reached the target in the median: no ratio (inf / inf, x / inf)
        o["ratio"] = o["median"] / base if 0 < base < math.inf else math.nan
    return sorted(out, key=lambda o: (o["median"], -o["pick_test"]))


def markdown(doc: dict) -> str:
    lines = []
    unit = "BLEU-4" if doc["metric"] == "bleu4" else "CIDEr-D"
    for arch, info in doc["archs"].items():
        sur = info["surrogate"]
        lines += [f"### {arch}", "",
                  f"Table: {info['configs']} configurations; best validation {unit} {info['best']:.4f}, target "
                  f"{info['target']:.4f} (within {doc['tolerance']}), reached by {info['within_target']} configurations; "
                  f"the preset scores {info['preset_score']:.4f}. A full training takes {info['full_training_s']:.1f} s; "
                  f"each search has {doc['budget']:g} full trainings of compute (horizon = that / W).",
                  f"Surrogate (nearest recorded configuration), leave-one-out on the final score: mean absolute error "
                  f"{sur['mae']:.4f} (the scores' standard deviation {sur['spread']:.4f}), Spearman {sur['spearman']:.2f}.",
                  "Spearman of each epoch's running best with the last epoch's: " +
                  ", ".join(f"e{e + 1} {c:.2f}" for e, c in enumerate(info["epoch_spearman"])) + ".", ""]
        for w in sorted({r["workers"] for r in doc["runs"]}):
            rows = rows_for(doc["runs"], arch, w)
            if not rows:
                continue
            lines += [f"W = {w} (simulated seconds to reach the target; median [quartiles] over seeds)", "",
                      "| strategy | median s | quartiles | ×random | reached | picked: val | picked: test | trials |",
                      "|---|---|---|---|---|---|---|---|"]
            for o in rows:
                lines.append(f"| {o['strategy']} | {fmt_s(o['median'])} | {fmt_s(o['q'][0])}-{fmt_s(o['q'][1])} | "
                             f"{fmt_ratio(o['ratio'])} | {o['reached']}/{o['seeds']} | {o['pick_val']:.4f} | "
                             f"{o['pick_test']:.4f} | {o['trials']:.0f} |")
            lines.append("")
    return "\n".join(lines)


def plot(doc: dict, workers: int, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(doc["archs"])
    fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = rows_for(doc["runs"], arch, workers)
        if not rows:
            continue
        shown = [o for o in rows if o["strategy"] == BASELINE] + [o for o in rows if o["strategy"] != BASELINE][:PLOTTED - 1]
        horizon = doc["budget"] * doc["archs"][arch]["full_training_s"] / workers
        grid = np.linspace(0, horizon, len(shown[0]["anytime"][0])) / 60
        for o in shown:
            a = np.where(np.isfinite(o["anytime"]), o["anytime"], np.nan)
            med = np.nanmedian(a, axis=0) if np.isfinite(a).any() else grid * np.nan
            lo, hi = np.nanpercentile(a, 25, axis=0), np.nanpercentile(a, 75, axis=0)
            line, = ax.plot(grid, med, label=o["strategy"], lw=2 if o["strategy"] == BASELINE else 1.5)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.12)
        info = doc["archs"][arch]
        ax.axhline(info["target"], color="k", ls="--", lw=1, label=f"target (best {info['best']:.3f} - {doc['tolerance']})")
        ax.set_ylim(info["target"] - 0.08 * (1 if doc["metric"] == "bleu4" else 4), info["best"] + 0.01)
        ax.set_title(f"{arch}: W = {workers}, median and quartiles over {doc['seeds']} seeds")
        ax.set_xlabel("simulated minutes")
        ax.set_ylabel(f"best validation {'BLEU-4' if doc['metric'] == 'bleu4' else 'CIDEr-D'} so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(path: str | Path) -> None:
    path = Path(path)
    doc = json.loads(path.read_text())
    text = markdown(doc)
    md = path.with_suffix(".md")
    md.write_text(text + "\n")
    print(text)
    for w in sorted({r["workers"] for r in doc["runs"]}):
        try:
            print(f"plot: {plot(doc, w, path.with_name(f'{path.stem}-w{w}.png'))}")
        except Exception as e:  # a figure never costs the replay its numbers
            print(f"plot for W={w} failed: {e}")


def merge(paths: list[str], out: str) -> Path:
    """Replays run apart (the GP sampler's, for its cost) into one: the same table, metric and budget."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    first = docs[0]
    for d in docs[1:]:
        if (d["table"], d["metric"], d["budget"]) != (first["table"], first["metric"], first["budget"]):
            sys.exit(f"cannot merge replays of other tables, metrics or budgets: {paths}")
    merged = {**first, "strategies": [s for d in docs for s in d["strategies"]],
              "runs": [r for d in docs for r in d["runs"]]}
    Path(out).write_text(json.dumps(merged, allow_nan=True))
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) > 2:  # replay_report.py A.json B.json ... OUT.json
        report(merge(sys.argv[1:-1], sys.argv[-1]))
    else:
        report(sys.argv[1])
