"""Screenshots of what a user sees of a finished sweep in the MLflow UI, in a real headless Chromium.

    python benchmarks/ui_screenshots.py NAME [--tracking-uri sqlite:///mlflow/mlflow.db] [--out DIR]

Starts `mlflow server` over the store on a free port (127.0.0.1), then, in a fresh browser
profile, saves: the sweep's leaderboard (its saved view, table and charts), the champion trial's
page, an architecture's parent run, the comparison run, and the champion's `val_examples.png`.
Needs Playwright (`pip install playwright`) and Debian's Chromium (`apt-get install
chromium-headless-shell`); without them it says so and exits 0. Look at the pictures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VIEWPORT = {"width": 2000, "height": 1100}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="the sweep's name (its MLflow experiment)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else mlflow/mlflow.db")
    p.add_argument("--out", type=Path, default=Path("/tmp/captune-ui"))
    args = p.parse_args()
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        browser = None
    if not browser:
        print("skipped: needs Playwright (pip install playwright) and Chromium (apt-get install "
              "chromium-headless-shell)")
        return 0

    from captune.infra.mlflow_store import default_tracking_uri
    from mlflow import MlflowClient
    from captune.search.mlflow_view import leaderboard_url, run_path

    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.name)
    if experiment is None:
        sys.exit(f"no sweep {args.name!r} in MLflow at {uri}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000,
                              filter_string=f"tags.`captune.sweep` = '{args.name}'")
    champion = next(r for r in runs if r.data.tags.get("captune.is_champion") == "true")
    parent = next(r for r in runs if r.info.run_id == champion.data.tags["mlflow.parentRunId"])
    comparison = next((r for r in runs if r.data.tags.get("captune.kind") == "compare"), None)
    args.out.mkdir(parents=True, exist_ok=True)
    with Server(uri, args.out / "server.log") as ui:
        def page(run, within: str = "") -> str:
            return f"{ui}/{run_path(experiment.experiment_id, run.info.run_id, within)}"

        pages = {"leaderboard": leaderboard_url(ui, experiment.experiment_id),
                 "champion-trial": page(champion), "parent": page(parent),
                 "val-examples": page(champion, "/artifacts/champion/val_examples.png")}
        if comparison is not None:
            pages["comparison"] = page(comparison)
        shoot(browser, pages, args.out)
    return 0


def shoot(browser: str, pages: dict[str, str], out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"])
        for name, url in pages.items():
            context = chromium.new_context(viewport=VIEWPORT)  # a fresh profile: nothing saved from before
            page = context.new_page()
            page.goto(url, wait_until="load", timeout=60_000)
            page.wait_for_timeout(6000)
            page.screenshot(path=out / f"{name}.png", full_page=True)
            print(f"{out / f'{name}.png'}  {url}")
            if name == "leaderboard":  # the same view's charts
                page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
                page.wait_for_timeout(5000)
                page.screenshot(path=out / "leaderboard-charts.png", full_page=True)
                print(f"{out / 'leaderboard-charts.png'}  (the chart view)")
            context.close()
        chromium.close()


class Server:
    """`mlflow server` over the store, on a free port of 127.0.0.1, for a `with` block."""

    def __init__(self, uri: str, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = log.open("w")
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return f"http://127.0.0.1:{self.port}"
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: see {self.log.name}") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


if __name__ == "__main__":
    sys.exit(main())
