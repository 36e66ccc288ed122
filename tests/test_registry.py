"""Champion promotion races: two promoters of one model name at once, in two processes on one real
MLflow store. The alias must end on the stronger model whichever order they run in."""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]

PROMOTER = """
import json, sys, time
import pytest
from pathlib import Path
from mlflow import MlflowClient
from captune.search import registry

uri, version, score, delay, locked, ready, go = (sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                                                 sys.argv[5] == "1", Path(sys.argv[6]), Path(sys.argv[7]))
client = MlflowClient(uri)
read = client.get_model_version_by_alias

def slow_read(*args, **kwargs):  # widen the window between reading the champion and moving the alias
    try:
        return read(*args, **kwargs)
    finally:  # also when there is no champion yet (MLflow raises)
        time.sleep(1.0)

client.get_model_version_by_alias = slow_read
ready.write_text("ready")  # imports done: wait for the common start
while not go.exists():
    time.sleep(0.005)
start = float(go.read_text()) + delay
while time.time() < start:
    time.sleep(0.001)
if locked:
    with registry.promotion_lock(client, "captune-race"):
        result = registry.claim_alias(client, "captune-race", version, score, "same-split", None, {})
else:
    result = registry.claim_alias(client, "captune-race", version, score, "same-split", None, {})
print(json.dumps(result))
"""


def race(tmp_path: Path, name: str, locked: bool, new_store) -> tuple:
    uri = new_store(tmp_path / f"{name}.db")
    client = MlflowClient(uri)
    client.create_registered_model("captune-race")
    versions = {}
    for score in (0.6, 0.3):  # the stronger model, then a weaker one
        v = client.create_model_version("captune-race", source=str(tmp_path), tags={"bleu4": str(score),
                                                                                      "val_key": "same-split"})
        versions[score] = str(v.version)
    go = tmp_path / f"{name}.go"
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, uri, versions[score], str(score), str(delay),
                               "1" if locked else "0", str(tmp_path / f"{name}-{score}.ready"), str(go)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for score, delay in ((0.6, 0.0), (0.3, 0.3))]  # the weaker one 0.3 s later, inside the 1 s window
    deadline = time.time() + 120
    while not all((tmp_path / f"{name}-{s}.ready").exists() for s in (0.6, 0.3)) and time.time() < deadline:
        time.sleep(0.05)
    # the start time appears whole (a promoter polling for the file could read it empty, half written)
    (tmp_path / f"{name}.go.partial").write_text(str(time.time() + 0.5))
    os.replace(tmp_path / f"{name}.go.partial", go)
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert not [m for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]  # released
    return str(client.get_model_version_by_alias("captune-race", "champion").version), versions, results


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_racing_promoters_leave_the_alias_on_the_stronger_model(tmp_path, new_store):
    # the same race without the lock, beside it, is the fault this guards against: the weaker model wins
    with ThreadPoolExecutor(2) as pool:
        locked, unlocked = pool.map(lambda locked: race(tmp_path, f"locked{locked}", locked, new_store), (True, False))
    final, versions, results = locked
    assert final == versions[0.6]
    weak = [r for r in results if r["version"] == versions[0.3]][0]
    assert weak["promoted"] is False and str(weak["previous"]["version"]) == versions[0.6]
    final, versions, _ = unlocked
    assert final == versions[0.3]


def test_champion_record_round_trips_through_short_readable_tags():
    from captune.infra.mlflow_names import champion_record, champion_tags

    kept = {"name": "captune-cnn-lstm", "version": "4", "metric": "cider", "score": 0.81, "promoted": False,
            "previous": {"version": "2", "score": 0.834567}}
    tags = champion_tags(kept)
    assert tags == {"captune.champion": "models:/captune-cnn-lstm/4", "captune.champion_promoted": "false",
                    "captune.previous_champion": "models:/captune-cnn-lstm/2",
                    "captune.previous_champion_score": "0.834567"}
    assert champion_record(tags, 0.81, "cider") == kept
    first = {"name": "captune-resnet-gru", "version": "1", "metric": "bleu4", "score": 0.3, "promoted": True,
             "previous": None}
    assert champion_record(champion_tags(first), 0.3) == first
    assert champion_record({}, 0.3) is None
    # as sweeps recorded it before the metric could be chosen: a JSON record, then BLEU-4 tags
    old = {"name": "captune-resnet-gru", "version": "3", "bleu4": 0.3, "promoted": False,
           "previous": {"version": "1", "bleu4": 0.4}}
    assert champion_record({"captune.champion": json.dumps(old)}, 0.0) == {
        "name": "captune-resnet-gru", "version": "3", "metric": "bleu4", "score": 0.3, "promoted": False,
        "previous": {"version": "1", "score": 0.4}}
    before = {"captune.champion": "models:/captune-cnn-lstm/4", "captune.champion_promoted": "false",
              "captune.previous_champion": "models:/captune-cnn-lstm/2", "captune.previous_champion_bleu4": "0.25"}
    assert champion_record(before, 0.2)["previous"] == {"version": "2", "score": 0.25}


def test_control_verdict_is_words_in_its_tag_and_clear_from_the_gap():
    from captune.infra.mlflow_names import control_verdict

    text = "the cnn-lstm champion beats its image-blind control by 0.41 BLEU-4"
    assert control_verdict({"captune.control_verdict": text}, {"control_gap_low": 0.36}) == {"clear": True, "text": text}
    assert not control_verdict({"captune.control_verdict": text}, {"control_gap_low": -0.01})["clear"]
    old = {"clear": False, "text": "no clear difference"}
    assert control_verdict({"captune.control_verdict": json.dumps(old)}, {}) == old  # as sweeps recorded it before
    # a CIDEr-D sweep's verdict is clear from its CIDEr-D gap
    assert control_verdict({"captune.control_verdict": text}, {"control_gap_low": -0.1, "control_cider_gap_low": 0.2},
                           "cider")["clear"]


def test_control_record_reads_both_scores_back():
    from captune.infra.mlflow_names import CONTROL_FIELDS, control_metrics, control_record

    values = {"bleu4": (0.1, 0.11, 0.5, 0.39, 0.35, 0.43), "cider": (0.2, 0.21, 1.5, 1.29, 1.1, 1.4)}
    metrics = {name: v for score, vs in values.items() for name, v in zip(control_metrics(score), vs)}
    assert control_metrics("bleu4") == ("control_bleu4", "control_test_bleu4", "test_bleu4", "control_gap",
                                        "control_gap_low", "control_gap_high")
    record = control_record({"captune.control_verdict": "beats"}, metrics, "cider")
    assert record["scores"] == {s: dict(zip(CONTROL_FIELDS, v)) for s, v in values.items()}
    assert record["verdict"] == {"clear": True, "text": "beats"} and record["metric"] == "cider"
    bleu_only = {k: v for k, v in metrics.items() if "cider" not in k}  # a sweep recorded before CIDEr-D
    assert control_record({}, bleu_only, "bleu4")["scores"].keys() == {"bleu4"}
    assert control_record({}, bleu_only, "cider") is None
