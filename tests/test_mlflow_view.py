"""The saved runs view that makes a sweep's experiment open as its leaderboard (captune.search.mlflow_view):
the tag it writes, and the view as the MLflow UI shows it in a real browser."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

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
                                        "tags.`captune.end_state`", "metrics.`seed_mean`", "tags.`captune.seed_group`",
                                        "metrics.`tuned_bleu4`", "metrics.`latency_p50_ms_greedy`",
                                        "metrics.`latency_p50_ms_tuned`", "tags.`captune.front`"]
    assert state["runsHiddenMode"] == "SHOW_ALL"  # every trial, not the first 10
    # the Pareto fronts: the objective against latency, greedy; the score at the tuned decoding against its latency
    scatters = [(c["xaxis"], c["yaxis"]) for c in state["compareRunCharts"] if c["type"] == "SCATTER"]
    assert scatters == [({"key": "latency_p50_ms_greedy", "type": "METRIC"}, {"key": "best_bleu4", "type": "METRIC"}),
                        ({"key": "latency_p50_ms_tuned", "type": "METRIC"}, {"key": "tuned_bleu4", "type": "METRIC"})]
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # its own MLflow server and browser
def test_the_saved_view_opens_in_a_browser_sorted_with_the_objective_in_sight(finished_sweep, tmp_path):
    """The address a sweep prints, opened in headless Chromium at 1600 x 1000 over `mlflow/server.sh`
    on the sweep's store: the UI applies the view (trials only, sorted by the objective, best first)
    and the objective's column is in sight, left of the UI's assistant panel."""
    browser_path = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not browser_path:
        pytest.skip("no Chromium: apt-get install -y chromium-headless-shell (.ci/run does, as root)")
    from captune.search.mlflow_view import leaderboard_url
    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    port = _free_port()
    env = {**os.environ, "BACKEND_URI": finished_sweep.tracking_uri, "PORT": str(port),
           "ARTIFACTS": str(tmp_path / "artifacts")}
    server = subprocess.Popen(["bash", str(root / "mlflow" / "server.sh")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow/server.sh ended"
                time.sleep(0.5)
        experiment_id = MlflowClient(finished_sweep.tracking_uri).get_experiment_by_name("s1").experiment_id
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(leaderboard_url(ui, experiment_id), wait_until="load", timeout=60_000)
            # the view applied: the UI writes its filter and order into the page's address
            page.wait_for_url(lambda u: "searchFilter=" in u and "orderByKey=" in u, timeout=60_000)
            assert "searchFilter=tags.%60captune.kind%60+%3D+%27trial%27" in page.url, page.url
            assert "orderByKey=metrics.%60best_cider%60" in page.url and "orderByAsc=false" in page.url, page.url
            page.get_by_text("6 matching runs").wait_for(state="visible", timeout=60_000)  # the trials only
            # the objective's column ("s1" maximises CIDEr-D) is in sight: at its header's centre, in the
            # window, the page shows that header, not a column scrolled under the assistant's panel
            headers = page.get_by_role("columnheader").filter(has_text=re.compile(r"^best_cider$"))
            headers.first.wait_for(state="visible", timeout=30_000)
            shown = headers.evaluate_all("""cells => cells.some(cell => {
                const r = cell.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;
                const hit = x >= 0 && x <= innerWidth && y >= 0 && y <= innerHeight && document.elementFromPoint(x, y);
                return !!hit && (cell === hit || cell.contains(hit) || hit.contains(cell));
            })""")
            assert shown, page.screenshot(path=str(tmp_path / "view.png")) and f"best_cider is off-screen: {tmp_path / 'view.png'}"
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
