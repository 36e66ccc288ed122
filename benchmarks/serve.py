"""The champion in use: what HTTP serving costs over calling the model in-process, and how fast
`captune caption` captions a folder.

    python benchmarks/serve.py [--data datasets/synth] [--work /tmp/captune-serve] [--epochs 3]
                               [--model cnn-lstm=runs/x/model.pt ...] [--requests 50] [--pin]

Each architecture's default model (the dataset's preset; trained for --epochs here unless
--model gives one) is logged and registered as MLflow does for a sweep's champion, then served
by the real `mlflow models serve`. Printed per architecture: single-image request latency p50/p95
(beam 1 and 3) and batch-of-32 throughput, over HTTP and through the same pyfunc model loaded
in-process, with their ratio (the HTTP overhead); then captions per second of `captune caption`
on a folder of 1,000 built-in images, whole command and steady rate.

--pin separates what MLflow's server costs from what the benchmark's own client costs on a small
machine: the server runs on the last core with one torch thread (`taskset`, OMP_NUM_THREADS=1),
the client on the first core, and the in-process model on the server's core with one thread.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
CAPTUNE = [sys.executable, "-m", "captune.cli"]
ARCHS = ("cnn-lstm", "resnet-gru")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("datasets/synth"))
    p.add_argument("--work", type=Path, default=Path("/tmp/captune-serve"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", action="append", default=[], metavar="ARCH=PATH")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--pin", action="store_true", help="server and in-process model on the last core, one thread; "
                                                      "the client on the first")
    p.add_argument("--skip-caption", action="store_true", help="only the serving figures")
    args = p.parse_args()
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    uri = f"sqlite:///{args.work / 'mlflow.db'}"
    given = dict(m.split("=", 1) for m in args.model)
    images = sorted((args.data / "Images").iterdir())

    rows = []
    for arch in ARCHS:
        checkpoint = Path(given[arch]) if arch in given else train(arch, args)
        register(arch, checkpoint, uri)
        rows.append(measure(arch, uri, images, args))
    caption = None
    if not args.skip_caption:
        folder = photo_folder(images, args.work / "photos", 1000)
        caption = caption_rate(Path(given.get("resnet-gru") or args.work / "resnet-gru" / "model.pt"), folder,
                               args.work)

    print(f"\n{'model':11s} {'what':32s} {'HTTP':>10s} {'in-process':>11s} {'HTTP / in-process':>18s}")
    for r in rows:
        for what, (http, local) in r["figures"].items():
            unit = "img/s" if "throughput" in what else "ms"
            print(f"{r['arch']:11s} {what:32s} {http:7.1f} {unit:>5s} {local:8.1f} {unit:>5s} {http / local:18.2f}")
    if caption:
        print(f"\ncaptune caption, 1,000 images, beam 3, resnet-gru: {caption['images_per_s_whole']:.1f} captions/s "
              f"for the whole command ({caption['seconds']:.1f} s, start-up and model load included), "
              f"{caption['images_per_s_steady']:.1f} captions/s steady")
    (args.work / "results.json").write_text(json.dumps({"models": rows, "caption": caption}, indent=1))


def train(arch: str, args) -> Path:
    out = args.work / arch
    subprocess.run([*CAPTUNE, "train", "--arch", arch, "--data", str(args.data), "--epochs", str(args.epochs),
                    "--out", str(out), "--tracking-uri", f"sqlite:///{args.work / 'train.db'}"],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "model.pt"


def register(arch: str, checkpoint: Path, uri: str) -> None:
    import mlflow
    from captune.infra.mlflow_store import get_or_create_experiment
    from captune.serving.logged_model import log_captioner

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=get_or_create_experiment("serve-benchmark", uri)):
        info = log_captioner(checkpoint, f"captune-{arch}")
    mlflow.MlflowClient().set_registered_model_alias(f"captune-{arch}", "champion", info.registered_model_version)


def measure(arch: str, uri: str, images: list[Path], args) -> dict:
    import mlflow.pyfunc
    import pandas as pd

    one = [base64.b64encode(images[0].read_bytes()).decode()]
    batch = [base64.b64encode(p.read_bytes()).decode() for p in images[:32]]
    cases = {"single image, beam 1 (p50)": (one, 1), "single image, beam 3 (p50)": (one, 3)}
    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = (cores[-1], cores[0]) if args.pin else (None, None)
    with serve(f"models:/captune-{arch}@champion", uri, args.work / f"serve-{arch}.log", server_core) as port:
        with on_core(client_core):
            http = {name: timings(lambda: post(port, rows, beam), args.requests)
                    for name, (rows, beam) in cases.items()}
            http_batch = timings(lambda: post(port, batch, 3), 10)
    model = mlflow.pyfunc.load_model(f"models:/captune-{arch}@champion")
    with on_core(server_core, threads=1 if args.pin else None):
        local = {name: timings(lambda: model.predict(pd.DataFrame({"image": rows}), params={"beam": beam}),
                               args.requests) for name, (rows, beam) in cases.items()}
        local_batch = timings(lambda: model.predict(pd.DataFrame({"image": batch}), params={"beam": 3}), 10)
    figures = {}
    for name in cases:
        figures[name] = (quantile(http[name], 0.5), quantile(local[name], 0.5))
        figures[name.replace("p50", "p95")] = (quantile(http[name], 0.95), quantile(local[name], 0.95))
    figures["batch of 32, beam 3 throughput"] = (32 / statistics.median(http_batch) * 1000,
                                                32 / statistics.median(local_batch) * 1000)
    return {"arch": arch, "figures": figures}


def timings(call, n: int) -> list[float]:
    for _ in range(3):  # warm-up
        call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def post(port: int, images: list[str], beam: int) -> list[str]:
    body = json.dumps({"inputs": {"image": images}, "params": {"beam": beam}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


class on_core:
    """This process on one core (and torch on `threads` threads) for a `with` block; None: as it is."""

    def __init__(self, core: int | None, threads: int | None = None):
        self.core, self.threads = core, threads

    def __enter__(self):
        import torch

        self.before = (os.sched_getaffinity(0), torch.get_num_threads())
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc) -> None:
        import torch

        os.sched_setaffinity(0, self.before[0])
        torch.set_num_threads(self.before[1])


class serve:
    """`mlflow models serve` of a model on a free port (on one core with one torch thread if
    `core` is given), for a `with` block."""

    def __init__(self, model: str, uri: str, log: Path, core: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
        pin = [] if core is None else ["taskset", "-c", str(core)]
        if core is not None:
            env["OMP_NUM_THREADS"] = "1"
        self.log = log.open("w")
        self.proc = subprocess.Popen([*pin, str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> int:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2)
                return self.port
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: see {self.log.name}") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


def photo_folder(images: list[Path], folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for n in range(count):
        os.link(images[n % len(images)], folder / f"p{n:04d}{images[n % len(images)].suffix}")
    return folder


def caption_rate(checkpoint: Path, folder: Path, work: Path) -> dict:
    out = work / "captions.csv"
    start = time.perf_counter()
    subprocess.run([*CAPTUNE, "caption", str(checkpoint), str(folder), "--out", str(out), "--beam", "3"],
                   check=True, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    assert out.read_text().count("\n") == 1001, "one row per image and the header"
    # the steady rate: in this process, the model loaded, over the same folder
    from captune.caption_files import CaptionFile, caption_files, find_images
    from captune.trainables.checkpoint import load_checkpoint
    from captune.trainables.decoding import Decoding

    loaded, again = load_checkpoint(checkpoint), work / "again.csv"
    images = find_images([folder])
    writer = CaptionFile(again)
    start = time.perf_counter()
    caption_files(loaded, images, writer, Decoding(beam=3))
    steady = time.perf_counter() - start
    writer.close()
    return {"seconds": seconds, "images_per_s_whole": 1000 / seconds, "images_per_s_steady": 1000 / steady}


if __name__ == "__main__":
    main()
