"""The leaderboard, ready in MLflow's UI: a saved runs view on each sweep's experiment.

MLflow 3.17's UI keeps saved runs views as experiment tags `mlflow.sharedViewState.<key>`: a JSON
envelope {name, createdAt, updatedAt, state}, `state` the JSON text of the runs page's search
facets and UI state (what the UI's "Save as new view" writes; it reads uncompressed text as well
as its own compressed form). The URL `#/experiments/<id>/runs?viewStateShareKey=<key>` opens it.
The field names below are the UI's (its bundle, `mlflow/server/js/build`); nothing else documents
them. Breaks first: tests/test_mlflow_view.py::test_the_saved_view_opens_in_a_browser_sorted_with_the_objective_in_sight,
which opens it in a real browser.
"""
from __future__ import annotations

import json
import time
import uuid

from captune.infra.mlflow_names import (FRONT_TAG, KIND_TAG, SEED_GROUP_TAG, SEED_MEAN_METRIC, STATE_TAG, p50_metric,
                                        tuned_metric)
from captune.search.objective import DEFAULT_METRIC, objective
from captune.trainables.catalog import HEADLINE, SCORE_LABELS

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_NAME = "captune leaderboard"
# One key for every sweep's experiment: the same URL shape everywhere, rewritten idempotently.
VIEW_KEY = str(uuid.uuid5(uuid.NAMESPACE_URL, "captune/leaderboard-view/1"))
MODEL_SECTION = "Model metrics"  # the UI's own sections, kept after the leaderboard's
SYSTEM_SECTION = "System metrics"


def column(kind: str, key: str) -> str:
    """The UI's key of a runs-table column ("metrics.`best_bleu4`")."""
    return f"{kind}.`{key}`"


def columns(metric: str) -> list[str]:
    """The leaderboard's columns: the objective first, then the best epoch's other headline scores,
    last the choice over seeds (captune.search.seed_choice).
    No attribute columns: in a 1600 x 1000 window, with the UI's assistant panel open, the Dataset
    and Models columns pushed every score off-screen (tests/test_mlflow_view.py, in a browser)."""
    scores = [metric] + [k for k in HEADLINE if k != metric]
    return [column("params", "arch"), *(column("metrics", objective(k)) for k in scores),
            column("metrics", "best_epoch"), column("params", "lr"), column("params", "hidden_size"),
            column("params", "vocab_threshold"), column("tags", STATE_TAG),
            # a trial retrained over new seeds to choose the champion: its mean, and chosen / tied / behind
            column("metrics", SEED_MEAN_METRIC), column("tags", SEED_GROUP_TAG),
            # how fast it is (captune.search.speed): its score at the tuned decoding, latency, fronts
            column("metrics", tuned_metric(metric)), column("metrics", p50_metric("greedy")),
            column("metrics", p50_metric("tuned")), column("tags", FRONT_TAG)]


def leaderboard_state(metric: str = DEFAULT_METRIC) -> dict:
    """Trials only, best first by the sweep's `metric`, the leaderboard's columns, every run
    shown, and five charts in a section of their own: the best score per trial (bar), parallel
    coordinates of the searched parameters against it, its curves per epoch, and the score against
    latency per image, greedy and at the tuned decoding (scatter: the Pareto fronts)."""
    section, target, label = _id("section"), objective(metric), SCORE_LABELS[metric]
    charts = [
        {**_card("BAR", "bar", section), "metricKey": target, "displayName": f"best {label} per trial",
         "selectedMetricKeys": None, "datasetName": None, "dataAccessKey": None, "runsCountToCompare": 100},
        {**_card("PARALLEL", "parallel", section), "selectedParams": ["lr", "hidden_size", "vocab_threshold"],
         "selectedMetrics": [target], "showAllRuns": True, "displayName": "searched parameters",
         "runsCountToCompare": 100},
        {**_card("LINE", "curves", section), "metricKey": metric, "displayName": f"validation {label} per epoch",
         "selectedMetricKeys": [metric], "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
         "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [],
         "ignoreOutliers": False, "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False,
         "runsCountToCompare": 100},
        *({**_card("SCATTER", f"speed-{decoding}", section), "runsCountToCompare": 100,
           "xaxis": {"key": p50_metric(decoding), "type": "METRIC"}, "yaxis": {"key": score, "type": "METRIC"},
           "displayName": f"{label} against ms per image, {decoding}"}
          for decoding, score in (("greedy", target), ("tuned", tuned_metric(metric)))),
    ]
    sections = [{"uuid": section, "name": "Leaderboard", "display": True, "isReordered": False, "deleted": False,
                 "isGenerated": False},
                *({"uuid": _id(name), "name": name, "display": False, "isReordered": False, "deleted": False,
                   "isGenerated": True} for name in (MODEL_SECTION, SYSTEM_SECTION))]
    return {
        "searchFilter": f"tags.`{KIND_TAG}` = 'trial'", "orderByKey": column("metrics", target),
        "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns(metric), "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts, "compareRunSections": sections, "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": True, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                                        "selectedXAxisMetricKey": ""},
    }


def _card(kind: str, name: str, section: str) -> dict:
    return {"uuid": _id(name), "type": kind, "metricSectionId": section, "deleted": False, "isGenerated": False}


def _id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"captune/leaderboard-view/{name}"))


def save_leaderboard_view(client, experiment_id: str, metric: str = DEFAULT_METRIC) -> str:
    """Write the view on the experiment (again: the same key, the current definition); returns its key."""
    now = int(time.time() * 1000)
    envelope = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(leaderboard_state(metric))}
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(envelope))
    return VIEW_KEY


def leaderboard_url(ui: str, experiment_id: str) -> str:
    """The address that opens a sweep's leaderboard in the MLflow UI at `ui` (http://host:port),
    on the runs table (the UI otherwise opens an experiment on its GenAI pages)."""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def run_path(experiment_id: str, run_id: str, within: str = "") -> str:
    """A run's page (or `within` it, e.g. "/artifacts/champion/val_examples.png") as a link inside
    the MLflow UI, in its model-training mode (the UI otherwise shows a run among GenAI pages)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{within}?workflowType=machine_learning"


def experiment_note(sweep: str, metric: str) -> str:
    return (f"captune sweep `{sweep}`: per architecture a parent run (`captune.kind` = search) with a child run per "
            f"trial (validation BLEU-1..4, CIDEr-D and ROUGE-L per epoch; `{objective(metric)}` at `best_epoch` is "
            f"what the search ranks and what the champion keeps, the other `best_` scores are that epoch's), the "
            f"champion's image-blind control, and the comparison on the test split.\n\n"
            "The leaderboard is the saved view \"captune leaderboard\" (the views menu at the top of the runs page): "
            "trials only, best first, with the searched parameters and charts. `captune leaderboard "
            f"{sweep}` prints it in a terminal.")
