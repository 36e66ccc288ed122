"""The comparison's chart (`comparison.png` in the sweep's comparison run: captune.search.compare)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from captune.infra.mlflow_names import CONTROLLED
from captune.trainables.catalog import SCORE_LABELS

# matplotlib is imported where the figure is drawn, after its Agg backend is chosen.


def draw_comparison(results: dict, name: str, path: Path) -> None:
    """Test scores per architecture (one colour each): BLEU-1..4 and ROUGE-L on the left, CIDEr-D
    (another scale) on the right; the champion (greedy), the seed replicates' mean with their
    standard deviation as error bars, and the image-blind control's BLEU-4 and CIDEr-D as dashed
    floors over that architecture's bars; the verdict below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, reps = results["models"], (results["replicates"] or {}).get("architectures") or {}
    bars = [(a, what) for a in models for what in ("champion", "replicates") if what == "champion" or a in reps]
    width = 0.8 / len(bars)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [5, 1.4]})
    for ax, keys in ((left, ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l")), (right, ("cider",))):
        for i, (arch, what) in enumerate(bars):
            colour = f"C{list(models).index(arch)}"
            x = [n + i * width for n in range(len(keys))]
            if what == "champion":
                ax.bar(x, [models[arch]["beam1"][k] for k in keys], width, color=colour, label=f"{arch} champion")
            else:
                ax.bar(x, [reps[arch][f"test_{k}"]["mean"] for k in keys], width, color=colour, alpha=0.5,
                       hatch="//", capsize=3, yerr=[reps[arch][f"test_{k}"]["std"] for k in keys],
                       label=f"{arch}, {len(reps[arch]['seeds'])} new seeds (mean ± sd)")
        for arch, m in models.items():
            for score in CONTROLLED:
                floor = ((m.get("control") or {}).get("scores") or {}).get(score)
                if floor and score in keys:
                    mine = [i for i, (a, _) in enumerate(bars) if a == arch]
                    at = keys.index(score)
                    ax.hlines(floor["control_test"], at + mine[0] * width - width / 2, at + mine[-1] * width + width / 2,
                              colors=f"C{list(models).index(arch)}", linestyles="dashed", linewidth=2, zorder=3,
                              label=f"{arch} image-blind control" if score == "bleu4" else None)
        ax.set_xticks([n + (len(bars) - 1) * width / 2 for n in range(len(keys))], [SCORE_LABELS[k] for k in keys])
    left.set(ylim=(0, 1.22), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], ylabel=f"{results['split']} split, greedy search",
             title=f"sweep {name}: champions compared")
    right.set(ylim=(0, max(1.0, 1.25 * max(models[a]["beam1"]["cider"] for a in models))), title="on its own scale")
    left.legend(fontsize=8, loc="upper left", ncol=3)
    fig.text(0.01, 0.01, textwrap.fill(f"verdict: {results['verdict']}", 150), fontsize=7.5, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
