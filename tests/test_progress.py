"""The sweep's console view (captune.search.progress), on a recorded stream of events."""
import io

from captune.search.progress import SweepView

# Two searches side by side, as the search tasks report them: times in seconds from the start.
EVENTS = [
    {"arch": "cnn-lstm", "kind": "note", "text": "3 trials, 1 at a time", "time": 0},
    {"arch": "cnn-lstm", "kind": "start", "trial": "aa11", "config": "lr=0.002 hidden_size=256", "time": 1},
    {"arch": "resnet-gru", "kind": "start", "trial": "bb22", "config": "lr=0.002 hidden_size=256", "time": 1},
    {"arch": "cnn-lstm", "kind": "end", "trial": "aa11", "state": "finished", "epochs": 4, "best": 0.31,
     "best_epoch": 3, "config": "lr=0.002 hidden_size=256", "time": 21},
    {"arch": "cnn-lstm", "kind": "start", "trial": "cc33", "config": "lr=0.0051 hidden_size=32", "time": 22},
    {"arch": "cnn-lstm", "kind": "end", "trial": "cc33", "state": "early-stopped", "epochs": 1, "best": 0.12,
     "best_epoch": 1, "config": "lr=0.0051 hidden_size=32", "time": 27},
]


def play(tty: bool) -> str:
    out, now = io.StringIO(), [0.0]
    view = SweepView("demo", {"cnn-lstm": 3, "resnet-gru": 2}, {"cnn-lstm": 1, "resnet-gru": 1}, out=out, tty=tty,
                     clock=lambda: now[0])
    for event in EVENTS:
        now[0] = event["time"]
        view.handle(event)
        view.tick()
    view.close()
    return out.getvalue()


def test_plain_lines_without_escape_codes_when_not_a_terminal():
    lines = play(tty=False).splitlines()
    assert "\x1b" not in "".join(lines) and "\r" not in "".join(lines)
    assert lines[:4] == [
        "[cnn-lstm] 3 trials, 1 at a time",
        "[cnn-lstm] trial 1 (aa11) started: lr=0.002 hidden_size=256",
        "[resnet-gru] trial 1 (bb22) started: lr=0.002 hidden_size=256",
        "[cnn-lstm] trial 1 (aa11) finished after 4 epoch(s), best BLEU-4 0.3100 (epoch 3)",
    ]
    # after each trial's end: how far each search is, the best so far, time spent and left
    assert lines[4] == ("sweep demo: cnn-lstm 1/3 done, 0 running, 2 pending, best 0.3100 by trial 1 (aa11); "
                        "resnet-gru 0/2 done, 1 running, 1 pending | 21s spent, time left: known after the first "
                        "trial ends")
    assert lines[-2] == "[cnn-lstm] trial 2 (cc33) early-stopped after 1 epoch(s), best BLEU-4 0.1200 (epoch 1)"
    # cnn-lstm: trials take 12.5 s on average, one at a time, one left; resnet-gru's estimate is not known yet
    assert lines[-1].startswith("sweep demo: cnn-lstm 2/3 done, 0 running, 1 pending, best 0.3100 by trial 1 (aa11)")
    assert lines[-1].endswith("| 27s spent, time left: known after the first trial ends")


def test_a_terminal_gets_bars_redrawn_in_place_and_the_same_event_lines():
    text = play(tty=True)
    assert "\r" in text  # redrawn in place
    assert "[cnn-lstm] trial 2 (cc33) early-stopped after 1 epoch(s), best BLEU-4 0.1200 (epoch 1)" in text
    redrawn = text.replace("\r", "\n").splitlines()
    final = [line for line in redrawn if line.startswith("cnn-lstm ")][-1]
    assert final.endswith("2/3 done, 0 running, 1 pending | best 0.3100 (trial 1)") and len(final) <= 80
    status = [line for line in redrawn if line.startswith("sweep demo: 27s spent")][-1]
    assert status == "sweep demo: 27s spent, time left: known after the first trial ends"
    assert text.rstrip().splitlines()[-1].startswith("sweep demo: cnn-lstm 2/3 done")  # the summary stays


def test_a_resumed_sweep_counts_the_trials_that_ended_before():
    out = io.StringIO()
    view = SweepView("demo", {"cnn-lstm": 3}, {"cnn-lstm": 1}, out=out, tty=False, clock=lambda: 0.0)
    view.ended_before("cnn-lstm", "aa11", 0.31, 3)
    view.handle({"arch": "cnn-lstm", "kind": "start", "trial": "cc33", "config": "lr=0.005", "time": 0})
    view.handle({"arch": "cnn-lstm", "kind": "end", "trial": "cc33", "state": "finished", "epochs": 2, "best": 0.4,
                 "best_epoch": 2, "config": "lr=0.005", "time": 0})
    assert "[cnn-lstm] trial 2 (cc33) started" in out.getvalue()
    assert "cnn-lstm 2/3 done, 0 running, 1 pending, best 0.4000 by trial 2 (cc33)" in out.getvalue()


def test_the_view_counts_the_budget_down_and_says_when_it_is_spent():
    # the same stream under a 25 s budget: what is left of it after each trial's end; the estimate
    # replaced by what the rest would take once it cannot fit; then the budget spent, with the one
    # trial still running stopping at its next epoch
    out, now = io.StringIO(), [0.0]
    view = SweepView("demo", {"cnn-lstm": 3}, {"cnn-lstm": 1}, out=out, tty=False, clock=lambda: now[0], deadline=25)
    for event in [e for e in EVENTS if e["arch"] == "cnn-lstm"]:
        now[0] = event["time"]
        view.handle(event)
    lines = out.getvalue().splitlines()
    assert lines[3] == ("sweep demo: cnn-lstm 1/3 done, 0 running, 2 pending, best 0.3100 by trial 1 (aa11) | 21s spent, "
                        "the rest would take about 40s: some trials will not start | budget: 4s left")
    assert lines[-1].endswith("| 27s spent, the rest would take about 12s: some trials will not start | budget spent: "
                              "no trial starts")
    now[0] = 26
    view.handle({"arch": "cnn-lstm", "kind": "start", "trial": "dd44", "config": "lr=0.003", "time": 26})
    assert view.summary().endswith("| budget spent: no trial starts, 1 running stop(s) at the next epoch")
