"""MLflow writes from any node, carried out on the driver's node.

A sweep's trials, controls, seed replicates and DDP workers run on whatever node Ray gives them;
the MLflow store is the driver's: a SQLite file on its disk, or a tracking server that listens on
its loopback (cluster.yaml binds MLflow to the head's 127.0.0.1, unreachable from the other
nodes, and exposes nothing). So no code on a worker opens the tracking URI itself: the driver
starts a relay, an actor pinned to its own node that holds an MlflowClient of its store, and hands
its handle to the work; a worker's RelayClient asks it over Ray, which every node already
reaches. An outage or a refusal of the store comes back as the MlflowClient's own exception, so
captune.infra.mlflow_logging.unavailable tells them apart as it does locally.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

# ray and mlflow are imported inside the functions: infra is imported by every layer.

# The MlflowClient methods a worker may call through a relay (a typo fails at once, by name).
METHODS = frozenset({"create_run", "delete_tag", "get_metric_history", "get_run", "log_batch", "log_dict",
                     "log_text", "search_runs", "set_tag", "set_terminated", "update_run"})


class _Relay:
    """The actor, on the driver's node. Threaded: a slow store (a SQLite file locked for 20 s)
    holds one caller, not all."""

    def __init__(self, tracking_uri: str):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # (and so the registry's, which models:/ URIs name)
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri)

    def call(self, method: str, args: tuple, kwargs: dict):
        return getattr(self.client, method)(*args, **kwargs)

    def fetch_file(self, artifact_uri: str, name: str) -> bytes:
        """The content of the file called `name` among the artifacts at `artifact_uri` (a model's
        checkpoint, say: models:/captune-cnn-lstm/3), fetched from the store here."""
        import mlflow

        with tempfile.TemporaryDirectory(prefix="captune-relay-") as folder:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=folder))
            found = sorted(local.rglob(name)) if local.is_dir() else [local]
            if not found:
                raise FileNotFoundError(f"{artifact_uri}: holds no file named {name}")
            return found[0].read_bytes()


def start_relay(tracking_uri: str):
    """A relay to the store `tracking_uri`, on this node (the driver's). It ends with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_concurrency=16)(_Relay)
    return actor.options(scheduling_strategy=here).remote(tracking_uri)


class RelayClient:
    """What a worker uses in place of an MlflowClient: the same methods (METHODS), carried out by
    the relay on the driver's node, and `fetch_file`. Picklable: it holds the actor's handle."""

    def __init__(self, relay):
        self.relay = relay

    def __getattr__(self, method: str):
        if method not in METHODS:
            raise AttributeError(f"RelayClient has no {method!r}: a worker's MLflow calls are {sorted(METHODS)}")
        return lambda *args, **kwargs: self._get(self.relay.call.remote(method, args, kwargs))

    def fetch_file(self, artifact_uri: str, name: str) -> bytes:
        return self._get(self.relay.fetch_file.remote(artifact_uri, name))

    @staticmethod
    def _get(ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            # The store's own exception (requests' ConnectionError, MlflowException, sqlalchemy's
            # OperationalError), as a local client raises it: callers tell outages by it.
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e.as_instanceof_cause()) from None

    def __reduce__(self):
        return RelayClient, (self.relay,)
