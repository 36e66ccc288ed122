"""What each `captune` command does, over the library functions. Each imports what it runs, in
its body: `captune --help`, or a refused option, answers before torch, Ray or MLflow load."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from captune.trainables.catalog import SCORE_LABELS, SCORES


def cmd_synth(args) -> int:
    from captune.data.synth import write_synthetic

    t0 = time.perf_counter()
    out = write_synthetic(args.out, images=args.images, seed=args.seed)
    print(f"wrote {args.images:,} images with 5 captions each to {out} in {time.perf_counter() - t0:.1f}s "
          f"(Kaggle layout, preset {out / 'captune.yaml'})")
    return 0


def cmd_check(args) -> int:
    from captune.data.check import check_dataset, format_report

    report = check_dataset(args.dir, seed=args.seed, decode_images=not args.no_decode, progress=not args.json)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def cmd_features(args) -> int:
    from captune.trainables.catalog import VGG_ENCODERS
    from captune.trainables.config import ConfigError, compose, parse_overrides, preset_layers

    arch = "cnn-lstm" if args.encoder in VGG_ENCODERS else "resnet-gru"  # the family the encoder serves
    overrides = parse_overrides(args.set)
    unknown = sorted(set(overrides) - {"pretrained", "seed", "skip_bad", "split_seed"})
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: features do not depend on it (they do on pretrained, seed, "
                          f"skip_bad, split_seed)")
    flags = {"encoder": args.encoder, "fine_tune": False,
             **({"image_size": args.image_size} if args.image_size else {})}
    cfg = compose(arch, preset_layers(args.data, arch) + [("command line", flags), ("--set", overrides)])
    from captune.infra.raycluster import init_ray
    from captune.trainables import WORKER_PRELOAD
    from captune.trainables.feature_job import build_features, feature_folder

    folder = feature_folder(args.storage)
    # Ray starts only if something is to be built: features already there are read from a
    # read-only store, and a store that cannot take new ones is refused before Ray starts.
    done = build_features(args.data, cfg, folder, images_from=args.images_from,
                          connect=lambda: init_ray(args.address, preload=WORKER_PRELOAD))
    verb = "built" if done.built else "already there"
    print(f"features of {done.shape[0]:,} images ({cfg.encoder}, {cfg.image_size}px, "
          f"{done.shape[1]} values each): {verb}, {done.seconds:.1f} s"
          + (f", {done.images_per_s:,.0f} images/s" if done.built else "")
          + f"\n  manifest {done.manifest}")
    if done.data.skipped:
        print(f"  {len(done.data.skipped)} bad item(s) left out (--set skip_bad=true)")
    return 0


def cmd_train(args) -> int:
    from captune.trainables.config import ConfigError, compose, parse_overrides, preset_layers, read_config_file

    if args.resume:  # the settings are the folder's; --epochs may add epochs
        from captune.train_record import resume_settings

        given = [flag for flag, value in (("--config", args.config), ("--set", args.set), ("--out", args.out),
                                          ("--image-blind", args.image_blind), ("--skip-bad", args.skip_bad))
                 if value]
        if given:
            raise ConfigError(f"--resume {args.resume}: {', '.join(given)} cannot be given: a resumed run keeps "
                              f"the settings in {args.resume}/run.json (only --epochs may change)")
        cfg, data, workers, gpu = resume_settings(Path(args.resume), arch=args.arch, data=args.data,
                                                  workers=args.workers, gpu=args.gpu, epochs=args.epochs)
        out = Path(args.resume)
    else:
        if not (args.arch and args.data):
            raise ConfigError("--arch and --data are required (or --resume OUT to go on with a stopped run)")
        layers = preset_layers(args.data, args.arch)
        if args.config:
            layers += read_config_file(args.config, args.arch)
        flags = {k: v for k, v in (("epochs", args.epochs), ("image_blind", args.image_blind or None),
                                   ("skip_bad", args.skip_bad or None)) if v is not None}
        layers += [("command line", flags), ("--set", parse_overrides(args.set))]
        cfg = compose(args.arch, layers)  # settings are checked before torch and Ray are loaded
        data, workers, gpu = args.data, args.workers or 1, args.gpu
        out = Path(args.out or Path("runs") / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if gpu:
        _require_gpu()
    from captune.training import run_train

    print(f"training {cfg.arch} on {data} with {workers} worker(s): " +
          ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    t0 = time.perf_counter()
    outcome = run_train(cfg, data, out, workers=workers, use_gpu=gpu, tracking_uri=args.tracking_uri,
                        experiment=args.experiment, ray_address=args.address, resume=bool(args.resume))
    again = f"captune train --resume {outcome.out_dir}"
    if outcome.metrics is None:
        print(f"stopped ({outcome.stopped}) before the first epoch ended: nothing to keep. To start again: {again}")
        return 130
    best, final = outcome.metrics["best"], outcome.metrics["final"]
    if outcome.stopped:
        print(f"stopped ({outcome.stopped}) after {time.perf_counter() - t0:.0f}s, in epoch {final['epoch'] + 1} of "
              f"{cfg.epochs}; epochs 1-{final['epoch']} are kept. To go on from there: {again}")
    else:
        print(f"done in {time.perf_counter() - t0:.0f}s. validation scores at the last epoch ({final['epoch']}): " +
              _scores_text(final))
    metric = outcome.metrics.get("metric", "bleu4")
    print(f"saved the best epoch by {SCORE_LABELS[metric]} ({best['epoch']}: {_scores_text(best)}) to "
          f"{outcome.checkpoint}, metrics in {outcome.out_dir / 'metrics.json'}")
    if outcome.recorded:
        print(f"MLflow run {outcome.run_id}: captune caption runs:/{outcome.run_id}/model IMAGE")
    return 130 if outcome.stopped else 0 if outcome.recorded else 1


def cmd_record(args) -> int:
    from captune.train_record import record_run

    if not record_run(Path(args.out), wait_s=args.wait):
        return 1
    print(f"MLflow run of {args.out} is complete")
    return 0


def cmd_evaluate(args) -> int:
    from captune.trainables.model_source import load_captioner

    loaded = load_captioner(args.model, args.tracking_uri)  # a wrong path fails before torch loads
    from captune.trainables.decoding import Decoding
    from captune.trainables.evaluation import evaluate_split

    how = _decoding(loaded, args, otherwise=Decoding(beam=1))  # (scores are greedy unless the model says)
    scores = evaluate_split(loaded, args.data, split=args.split, beam=how, skip_bad=args.skip_bad)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"{args.split} split, {scores['images']:,} images, {how.text()}: {_scores_text(scores)}")
    return 0


def _decoding(loaded, args, **otherwise):
    """The model's stored decoding (captune.trainables.inference.decoding_of), --beam and --alpha
    given overriding it."""
    import dataclasses

    from captune.trainables.inference import decoding_of

    given = {k: v for k, v in (("beam", args.beam), ("alpha", args.alpha)) if v is not None}
    return dataclasses.replace(decoding_of(loaded, **otherwise), **given)


def _scores_text(scores: dict) -> str:
    """"BLEU-1 0.6123  BLEU-2 ...  CIDEr-D 0.4567  ROUGE-L 0.5012", for the scores present."""
    return "  ".join(f"{SCORE_LABELS[k]} {scores[k]:.4f}" for k in SCORES if k in scores)


def cmd_caption(args) -> int:
    from captune.caption_files import CaptionFile, find_images
    from captune.trainables.model_source import load_captioner

    images = find_images(args.paths)  # a wrong path fails before the model or torch loads
    if not images:
        raise FileNotFoundError(f"no .jpg, .jpeg or .png images in {', '.join(args.paths)}")
    out = CaptionFile(args.out)  # its folder probed, the file locked and read: all before the model loads
    try:
        loaded = load_captioner(args.model, args.tracking_uri)
        import torch

        from captune.caption_files import caption_files

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        summary = caption_files(loaded, images, out, _decoding(loaded, args), args.batch_size, device)
    except KeyboardInterrupt:
        if args.out:
            print(f"captune: {len(out.done):,} captions are in {args.out}; run the same command again to caption "
                  "the rest", file=sys.stderr)
        raise
    finally:
        out.close()  # the lock with it: a failed model load must not hold the file in this process
    where = f" in {args.out}" if args.out else ""
    print(f"captioned {summary.captioned:,} images{where}" +
          (f" ({summary.already:,} already there)" if summary.already else "") +
          (f"; {len(summary.skipped):,} unreadable, skipped (listed above)" if summary.skipped else ""),
          file=sys.stderr)
    return 1 if summary.skipped else 0


def cmd_sweep(args) -> int:
    from captune.search.compare import compare, format_comparison
    from captune.search.leaderboard import format_leaderboard, leaderboard
    from captune.search.request import SweepRequest, optuna_url, plan, storage_root
    from captune.trainables.config import parse_overrides

    req = SweepRequest(name=args.name, data_root=args.data, archs=[a.strip() for a in args.arch.split(",") if a.strip()],
                       trials=args.trials, epochs=args.epochs, metric=args.metric, config_file=args.config,
                       time_budget=args.time_budget,
                       overrides=parse_overrides(args.set), workers_per_trial=args.workers_per_trial,
                       gpus_per_worker=args.gpus_per_worker, storage=args.storage, resume=args.resume,
                       more_trials=args.more_trials, warm_start=args.warm_start,
                       seeds=args.seeds, top=args.top, fast_within=args.fast_within, control=not args.no_control,
                       tracking_uri=args.tracking_uri,
                       address=args.address, verbose=args.verbose)
    t0 = time.perf_counter()
    planned = plan(req)  # settings and spaces refused in a second, before Ray, MLflow and torch load
    from captune.search.sweep import run_sweep

    outcomes = run_sweep(req, planned)
    print(f"\nsweep {args.name} done in {time.perf_counter() - t0:.0f}s")
    for o in outcomes:
        print("\n".join(f"[{o.arch}] {line}" for line in o.summary()))
    try:
        print("\nleaderboard:")
        print(format_leaderboard(leaderboard(args.name, args.tracking_uri), top=20))
        print()
        if any(o.champion for o in outcomes):
            try:
                print(format_comparison(compare(args.name, args.data, args.tracking_uri, seeds=req.seeds,
                                                address=args.address)))
            except KeyboardInterrupt:  # the searches are done: the resume goes straight to the comparison
                from captune.search.request import resume_command

                print(f"captune: the searches are done; to finish the comparison (replicates trained are kept, "
                      f"a stopped one goes on from its last epoch): {resume_command(req)}", file=sys.stderr)
                raise
        else:  # (the sweep did finish: nothing was registered to compare)
            print("no comparison: no search registered a model (each one's reason is above)")
    except Exception as e:
        from captune.infra.mlflow_logging import unavailable
        from captune.infra.mlflow_store import TrackingUnavailable

        if not unavailable(e):
            raise
        raise TrackingUnavailable(f"MLflow did not answer after the sweep ended ({type(e).__name__}). The sweep is "
                                  f"done and recorded; once the store answers, `captune leaderboard {args.name}` "
                                  f"and `captune compare {args.name} --data {args.data}"
                                  f"{f' --seeds {req.seeds}' if req.seeds else ''}` finish the report (a "
                                  f"replicate already trained is reused)") from None
    print(f"\nMLflow UI: {_ui_command(args.tracking_uri)}\nOptuna Dashboard ({_dashboard_install()}): "
          f"optuna-dashboard {optuna_url(storage_root(args.storage), args.name)} --host 127.0.0.1"
          f"\nleaderboard: {_leaderboard_url(args.name, args.tracking_uri)}")
    return 0 if any(o.champion for o in outcomes) else 1


def cmd_leaderboard(args) -> int:
    from captune.search.leaderboard import format_leaderboard, leaderboard

    board = leaderboard(args.name, args.tracking_uri)
    print(json.dumps(board, indent=2) if args.json else format_leaderboard(board, top=args.top))
    return 0


def cmd_speed(args) -> int:
    from captune.search.speed import measure_sweep

    print("\n".join(measure_sweep(args.name, args.tracking_uri, args.data, within=args.fast_within, again=True)))
    return 0


def cmd_compare(args) -> int:
    from captune.search.compare import compare, format_comparison

    try:
        results = compare(args.name, args.data, args.tracking_uri, skip_bad=args.skip_bad, seeds=args.seeds,
                          resamples=args.resamples, bootstrap_seed=args.bootstrap_seed, address=args.address)
    except KeyboardInterrupt:
        if args.seeds:
            print("captune: replicates trained are kept and a stopped one goes on from its last epoch: run the "
                  "same command again to finish", file=sys.stderr)
        raise
    print(json.dumps(results, indent=2) if args.json else format_comparison(results))
    return 0


def _ui_command(tracking_uri: str | None) -> str:
    """How to open the MLflow UI on the sweep's store: the checkout's mlflow/server.sh where it
    serves that store, else the `mlflow server` command itself (an installed captune has no script)."""
    from captune.infra.mlflow_store import checkout_server_script, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("http"):
        return f"open {uri}"
    script = checkout_server_script()
    if script and uri == f"sqlite:///{script.parent / 'mlflow.db'}":
        shown = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
        return f"{shlex.quote(str(shown))}   # then open http://127.0.0.1:5000"
    return (f"mlflow server --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port 5000"
            f"   # then open http://127.0.0.1:5000")


def _dashboard_install() -> str:
    """The install command of the dashboard extra, its pin read from captune's own metadata (an
    installed captune has no '.[dashboard]' to point at)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        pins = [r.split(";")[0].strip() for r in requires("captune") or [] if "extra == \"dashboard\"" in r]
    except PackageNotFoundError:
        pins = []
    return f"pip install {shlex.quote(pins[0] if pins else 'optuna-dashboard')}"


def _leaderboard_url(sweep: str, tracking_uri: str | None) -> str:
    """The address of the sweep's saved leaderboard view in the MLflow UI (captune.search.mlflow_view)."""
    from mlflow import MlflowClient

    from captune.infra.mlflow_store import default_tracking_uri
    from captune.search.mlflow_view import leaderboard_url

    uri = tracking_uri or default_tracking_uri()
    experiment = MlflowClient(uri).get_experiment_by_name(sweep)
    return leaderboard_url(uri if uri.startswith("http") else "http://127.0.0.1:5000", experiment.experiment_id)


def _require_gpu() -> None:
    import torch

    from captune.trainables.config import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA GPU is visible on this machine (train on CPU without --gpu)")
