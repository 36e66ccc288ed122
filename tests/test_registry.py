"""Champion promotion races: two promoters of one model name at once, in two processes on one real
MLflow store. The alias must end on the stronger model whichever order they run in."""
import json
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]

PROMOTER = """
import json, sys, time
from mlflow import MlflowClient
from search import registry

uri, version, score, start, locked = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
client = MlflowClient(uri)
read = client.get_model_version_by_alias

def slow_read(*args, **kwargs):  # widen the window between reading the champion and moving the alias
    try:
        return read(*args, **kwargs)
    finally:  # also when there is no champion yet (MLflow raises)
        time.sleep(0.6)

client.get_model_version_by_alias = slow_read
while time.time() < start:
    time.sleep(0.005)
if locked:
    with registry.promotion_lock(client, "captune-race"):
        result = registry.claim_alias(client, "captune-race", version, score, "same-split", None, {})
else:
    result = registry.claim_alias(client, "captune-race", version, score, "same-split", None, {})
print(json.dumps(result))
"""


def race(tmp_path: Path, name: str, locked: bool) -> tuple:
    uri = f"sqlite:///{tmp_path / name}.db"
    client = MlflowClient(uri)
    client.create_registered_model("captune-race")
    versions = {}
    for score in (0.6, 0.3):  # the stronger model, then a weaker one
        v = client.create_model_version("captune-race", source=str(tmp_path), tags={"bleu4": str(score),
                                                                                      "val_key": "same-split"})
        versions[score] = str(v.version)
    start = time.time() + 7  # both processes imported (torch too: ~4 s) and waiting by then
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, uri, versions[score], str(score), str(start + delay),
                               "1" if locked else "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for score, delay in ((0.6, 0.0), (0.3, 0.1))]  # the weaker one 0.1 s later
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert not [m for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]  # released
    return str(client.get_model_version_by_alias("captune-race", "champion").version), versions, results


def test_racing_promoters_leave_the_alias_on_the_stronger_model(tmp_path):
    final, versions, results = race(tmp_path, "locked", locked=True)
    assert final == versions[0.6]
    weak = [r for r in results if r["version"] == versions[0.3]][0]
    assert weak["promoted"] is False and str(weak["previous"]["version"]) == versions[0.6]
    # the same race without the lock is the fault this guards against: the weaker model wins
    final, versions, _ = race(tmp_path, "unlocked", locked=False)
    assert final == versions[0.3]
