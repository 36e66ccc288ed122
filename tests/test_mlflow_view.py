"""The saved runs view that makes a sweep's experiment open as its leaderboard (captune.search.mlflow_view)."""
import json

from captune.search.mlflow_view import VIEW_KEY, VIEW_TAG_PREFIX, leaderboard_url, save_leaderboard_view
from mlflow import MlflowClient


def test_the_view_is_an_experiment_tag_in_the_ui_s_saved_view_form(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("sweep-a")
    assert save_leaderboard_view(client, experiment_id) == VIEW_KEY
    save_leaderboard_view(client, experiment_id)  # again (a resumed sweep): the same one tag
    tags = client.get_experiment(experiment_id).tags
    assert [k for k in tags if k.startswith(VIEW_TAG_PREFIX)] == [VIEW_TAG_PREFIX + VIEW_KEY]
    envelope = json.loads(tags[VIEW_TAG_PREFIX + VIEW_KEY])
    assert envelope["name"] == "captune leaderboard" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])  # the UI reads `state` as JSON text
    assert state["searchFilter"] == "tags.`captune.kind` = 'trial'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best_bleu4`", False)
    assert state["selectedColumns"] == ["params.`arch`", "metrics.`best_bleu4`", "metrics.`best_cider`",
                                        "metrics.`best_rouge_l`", "metrics.`best_epoch`",
                                        "params.`lr`", "params.`hidden_size`", "params.`vocab_threshold`",
                                        "tags.`captune.end_state`", "attributes.`Models`",
                                        "attributes.`Dataset`"]
    assert state["runsHiddenMode"] == "SHOW_ALL"  # every trial, not the first 10
    charts = {c["type"]: c for c in state["compareRunCharts"]}
    assert charts["BAR"]["metricKey"] == "best_bleu4" and charts["LINE"]["selectedMetricKeys"] == ["bleu4"]
    assert charts["PARALLEL"]["selectedParams"] == ["lr", "hidden_size", "vocab_threshold"]
    sections = {s["uuid"]: s for s in state["compareRunSections"]}
    assert all(sections[c["metricSectionId"]]["name"] == "Leaderboard" for c in state["compareRunCharts"])
    # a sweep maximising CIDEr-D: ordered, first column and charts by it
    save_leaderboard_view(client, experiment_id, "cider")
    state = json.loads(json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG_PREFIX + VIEW_KEY])["state"])
    assert state["orderByKey"] == "metrics.`best_cider`" and state["selectedColumns"][1:4] == [
        "metrics.`best_cider`", "metrics.`best_bleu4`", "metrics.`best_rouge_l`"]
    charts = {c["type"]: c for c in state["compareRunCharts"]}
    assert charts["BAR"]["metricKey"] == "best_cider" and charts["LINE"]["selectedMetricKeys"] == ["cider"]
    assert charts["BAR"]["displayName"] == "best CIDEr-D per trial"
    # the printed address opens the runs table (not the GenAI pages) with the view
    assert leaderboard_url("http://127.0.0.1:5000", experiment_id) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={VIEW_KEY}")


def test_the_readme_and_the_server_script_give_the_view_s_address():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in (root / "README.md", root / "mlflow" / "server.sh"):
        assert f"viewStateShareKey={VIEW_KEY}" in doc.read_text(), doc
