"""The decoding chosen for a champion without retraining: its beam width, the length penalty's
alpha (captune.trainables.decoding.length_penalty; 0 ranks captions by total log-probability,
which favours short ones) and its most words, searched on the validation split by the sweep's
metric before the champion is registered; the registered model captions that way unless told
otherwise (captune.trainables.inference.decoding_of: `captune caption`, `captune evaluate`, the
served model's param defaults). The test split is scored with it once, by `captune compare`.

A grid, not a sampler: every decoding of it generates the validation captions from features
encoded once (0.1-0.5 s per decoding on the demo's 300 images and 2 CPU cores, 2026-12-07), so
all 42 cost less than one training epoch and need no model of the score."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from captune.trainables.catalog import CAPTION_BEAM, SCORE_LABELS
from captune.trainables.decoding import Decoding

BEAMS = (1, 2, 3, 5, 8)
ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)
SHORT = 16  # a shorter limit than training's, when training's is longer
BASELINE = Decoding(beam=CAPTION_BEAM)  # how a model captioned before: beam 3, no length penalty


def grid(max_len: int) -> list[Decoding]:
    """Every decoding tried (greedy once: the length penalty does not change its choice)."""
    limits = (None, SHORT) if max_len > SHORT else (None,)
    return [Decoding(beam, alpha if beam > 1 else 0.0, limit) for limit in limits for beam in BEAMS
            for alpha in (ALPHAS if beam > 1 else (0.0,))]


@dataclass
class DecodingChoice:
    metric: str
    chosen: Decoding
    score: float  # its validation score in `metric`
    baseline: float  # BASELINE's
    tried: int

    def statement(self) -> str:
        edge = [f"{what} {value:g}" for what, value, largest in (("beam", self.chosen.beam, max(BEAMS)),
                                                                 ("alpha", self.chosen.alpha, max(ALPHAS)))
                if value == largest]
        return (f"decoding: {self.chosen.text()}, validation {SCORE_LABELS[self.metric]} {self.score:.4f} "
                f"({self.score - self.baseline:+.4f} over {BASELINE.text()} without length penalty; the best of "
                f"{self.tried} decodings on the validation split)"
                + (f"; at the grid's edge ({', '.join(edge)}): beyond it is untried" if edge else ""))

    def tags(self) -> dict[str, str]:
        """Its model version's tags."""
        return {**decoding_tags(self.chosen), f"decoding_val_{self.metric}": f"{self.score:.6f}",
                "decoding_val_gain": f"{self.score - self.baseline:.6f}"}


def choose_decoding(loaded, data_root, metric: str, feature_set: str | None = None) -> DecodingChoice:
    """The decoding of the grid with the best validation score in `metric`; of equal scores, the
    cheapest (the smaller beam, then the smaller alpha, then the training limit)."""
    from captune.trainables.inference import max_len_of

    tried = grid(max_len_of(loaded))
    scores = validation_scores(loaded, data_root, tried, metric, feature_set)
    chosen = max(tried, key=lambda d: (scores[d], -d.beam, -d.alpha, d.max_len is None))
    return DecodingChoice(metric, chosen, scores[chosen], scores[BASELINE], len(tried))


def validation_scores(loaded, data_root, decodings: list[Decoding], metric: str,
                      feature_set: str | None = None, scorers: dict | None = None) -> dict[Decoding, float]:
    """The model's validation score in `metric` at each decoding. The validation images are read
    as the trials read them: from the cache their configuration names, or, with shared features
    (`feature_set`, a manifest: captune.trainables.feature_job), from those, no image decoded.
    `scorers`: scorers made before, by their references (kept there), for several models' scores."""
    from captune.trainables.config import TrainConfig
    from captune.trainables.evaluation import caption_split
    from captune.trainables.feature_job import load_feature_set
    from captune.trainables.metrics import CaptionScorer

    cfg = TrainConfig(**loaded.payload["train_config"])
    data = load_feature_set(feature_set, cfg.cache_path()) if feature_set else None
    captions, refs = caption_split(loaded, data_root, "val", tuple(decodings), cache_dir=cfg.cache_path(),
                                   skip_bad=cfg.skip_bad, data=data)
    scorers = {} if scorers is None else scorers
    key = "\n".join("\t".join(r) for r in refs)
    if key not in scorers:  # (preparing the references is most of a scorer's cost)
        scorers[key] = CaptionScorer(refs)
    return {d: scorers[key].scores(captions[d])[metric] for d in decodings}


def decoding_tags(decoding: Decoding) -> dict[str, str]:
    """A model version's tags for the decoding it captions by (decoding_from_tags reads them back)."""
    return {"decoding": decoding.text(), **{f"decoding_{k}": str(v) for k, v in asdict(decoding).items()}}


def decoding_from_tags(tags: dict[str, str]) -> Decoding | None:
    """The decoding a model version was registered with (decoding_tags), if one was chosen."""
    if "decoding_beam" not in tags:
        return None
    limit = tags.get("decoding_max_len", "None")
    return Decoding(int(tags["decoding_beam"]), float(tags.get("decoding_alpha", 0.0)),
                    None if limit in ("None", "") else int(limit))
