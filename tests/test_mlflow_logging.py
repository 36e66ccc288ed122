"""captune.infra.mlflow_logging, without Ray: system metrics on a run found by its tags."""
import threading
import time

import pytest
from captune.infra.mlflow_logging import system_metrics
from mlflow import MlflowClient


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_system_metrics_reach_the_run_created_after_the_block_began(tmp_path, new_store):
    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    experiment = client.create_experiment("sys")
    tags = {"captune.trial_id": "t1", "captune.sweep": "s"}
    client.create_run(experiment, tags={"captune.trial_id": "t0", "captune.sweep": "s"})  # another trial's
    created = []
    # The trial starts training before the driver has created its run: the run is looked up until found.
    later = threading.Timer(1.0, lambda: created.append(client.create_run(experiment, tags=tags).info.run_id))
    later.start()
    with system_metrics(client, experiment, tags, every_s=0.5):
        time.sleep(4)
    later.join()
    (run_id,) = created
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and len(memory) == len(cpu)
    assert all(0 <= m.value <= 100 for m in cpu) and all(m.value > 0 for m in memory)
    assert [m.step for m in cpu] == list(range(len(cpu)))
    # the monitor stopped with the block: nothing is logged after it
    time.sleep(1.5)
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == len(cpu)
    others = client.search_runs([experiment], filter_string="tags.`captune.trial_id` = 't0'")
    assert not [k for k in others[0].data.metrics if k.startswith("system/")]


def test_contract_mlflow_metric_monitors():
    # captune.infra.mlflow_logging samples MLflow 3.17's own monitors (what its SystemMetricsMonitor
    # runs): each collects into itself, aggregates to {name: value}, and clears; the names are
    # what MLflow logs under system/.
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    for monitor in (CPUMonitor(), DiskMonitor(), NetworkMonitor()):
        monitor.collect_metrics()
        monitor.collect_metrics()
        values = monitor.aggregate_metrics()
        assert values and all(isinstance(v, (int, float)) for v in values.values()), type(monitor).__name__
        monitor.clear_metrics()
        assert not monitor.aggregate_metrics() or all(v == 0 for v in monitor.aggregate_metrics().values())
    cpu = CPUMonitor()
    cpu.collect_metrics()
    assert {"cpu_utilization_percentage", "system_memory_usage_megabytes"} <= set(cpu.aggregate_metrics())
