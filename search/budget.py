"""A sweep's time budget (`--time-budget 6h`, the sweep file's `time_budget:`): no trial starts
after its deadline, and a trial running at the deadline stops at its next epoch boundary,
recorded as `out-of-time` (captune.search.objective) with its checkpoints kept. The controls,
the seed replicates and the comparison run after it.

The deadline is this command's: a `--resume` counts its own budget from its own start. Tune
pickles its searcher and stoppers into the experiment snapshot and a resume restores those, so
the search task does not hand them the deadline: it sets it in its own process's environment
(`set_deadline`), where the searcher reads it (`out_of_time`). A trial is handed it with its
setup (captune.search.trial.TrialSetup), which a resume builds anew.
"""
from __future__ import annotations

import os
import re
import time

# Light: the CLI reads --time-budget with it before Ray loads. The stopper is in captune.search.strategy.
DEADLINE_ENV = "CAPTUNE_SWEEP_DEADLINE"  # seconds since the epoch; unset: no budget
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = r"(\d+(?:\.\d+)?)([smhd])"  # one number and its unit: "1h" of "1h30m"


def parse_duration(text: str | int | float, what: str = "--time-budget") -> float:
    """Seconds in `text`: "90s", "3m", "1h30m", "6h", "2d", or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        spelled = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", spelled):
            seconds = float(spelled)
        elif re.fullmatch(f"(?:{_PART})+", spelled):
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(_PART, spelled))
        else:
            raise ValueError(f"{what} {text!r}: give a duration such as 90s, 30m, 6h or 1h30m (or seconds)")
    if not seconds > 0:
        raise ValueError(f"{what} {text!r}: a time budget must be more than 0 seconds")
    return seconds


def set_deadline(deadline: float | None) -> None:
    """This process's deadline (the search task's, read by its searcher)."""
    if deadline is None:
        os.environ.pop(DEADLINE_ENV, None)
    else:
        os.environ[DEADLINE_ENV] = repr(deadline)


def out_of_time() -> bool:
    """Whether this process's deadline (set_deadline) has passed."""
    value = os.environ.get(DEADLINE_ENV)
    return bool(value) and time.time() >= float(value)


def announce_budget(req, settings, searches: int) -> float | None:
    """The time budget's deadline from now (None without one), and what runs after it, said
    before the searches start. `req`: the SweepRequest; `settings`: its SweepSettings."""
    if not settings.time_budget:
        return None
    from captune.search.progress import duration_text  # (the console's; this module stays light)

    deadline = time.time() + settings.time_budget
    after = [f"{searches} image-blind control(s), one per architecture" if req.control else "",
             f"the top {req.top} configuration(s) of each search retrained with {req.seeds} new seed(s) each, to "
             f"choose its champion" if req.seeds else "",
             "the comparison on the test split"]
    print(f"time budget {duration_text(settings.time_budget)}: no trial starts after "
          f"{time.strftime('%H:%M:%S', time.localtime(deadline))}, and a trial running then stops at its next epoch "
          f"(recorded out-of-time, its checkpoints kept). After it: {', '.join(filter(None, after))}"
          + ("; each control and replicate trains as long as one full trial." if req.control or req.seeds else "."),
          flush=True)
    return deadline
