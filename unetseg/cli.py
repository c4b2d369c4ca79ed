"""The `unetseg` command: local training, the demo, synthetic data, and (from other modules) image and predict.

Importing this module stays light; each command imports what it needs (torch only for training/prediction).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .contract.codecs import TTA_MODES
from .contract.config import TrainConfig
from .contract.errors import OutputError, UnetsegError, UsageError, write_failure_reason
from .contract.ground_truth import is_manifest
from .contract.layout import TRAIN_CHANNEL, VALIDATION_CHANNEL, VALIDATION_FOLDERS, folder_names, read_layout
from .contract.sagemaker_env import MLFLOW_EXPERIMENT_ENV, MLFLOW_TRACKING_URI_ENV, stopped_exit_code
from .runtime import EXPORT_FORMATS


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["image"]:  # build and push the container image: its own argument parser
        from .client import docker_image

        return _guarded(lambda: docker_image.main(argv[1:]))
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _guarded(lambda: args.run(args, extra))


def _guarded(run) -> int:
    try:
        return run() or 0
    except UnetsegError as exc:  # the user's input: say what is wrong, no stack trace
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and stops on its own)
        print("error: interrupted (Ctrl-C) before the command finished; run it again to start over", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetseg",
                                     description="Train U-Net segmentation models locally and on SageMaker.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train locally on a folder with images/ and masks/ (or train/ and validation/)",
                       description="Train in this process. Hyperparameters: key=value or --key value "
                                   "(see `unetseg hyperparameters`).")
    p.add_argument("--data", required=True, type=Path,
                   help="a folder with images/ and masks/, or with train/ and validation/, or a Ground Truth output "
                   "manifest (.manifest) of local paths")
    p.add_argument("--validation", type=Path,
                   help="validation folder (default: validation/ beside train/, else a held-out fraction)")
    p.add_argument("--output", type=Path, help="run folder: model/, checkpoints/, output/ (default: runs/<time>); "
                                               "the same folder resumes an interrupted run")
    p.add_argument("--init-model", help="start from this trained unetseg model (folder, model.tar.gz or s3://...): "
                                        "fine-tuning; a different class count gets a new head")
    p.add_argument("--mlflow-uri", help=f"log the run to this MLflow server (http(s) URL or SageMaker MLflow ARN; "
                                        f"default ${MLFLOW_TRACKING_URI_ENV}); the run is named after --output")
    p.add_argument("--mlflow-experiment",
                   help=f"the MLflow experiment (default ${MLFLOW_EXPERIMENT_ENV}, else unetseg)")
    p.set_defaults(run=_train)

    p = sub.add_parser("demo", help="make a synthetic dataset and train a small model on it (no AWS, no Docker)")
    p.add_argument("--output", type=Path, default=Path("demo"), help="where the data and the run go (default: ./demo)")
    p.add_argument("--kind", choices=("binary", "multiclass"), default="multiclass")
    p.add_argument("--epochs", type=int, default=12)
    p.set_defaults(run=_demo)

    p = sub.add_parser("demo-data", help="write a synthetic dataset (train/ and validation/)")
    p.add_argument("folder", type=Path)
    p.add_argument("--kind", choices=("binary", "multiclass"), default="binary")
    p.add_argument("--train", type=int, default=48, help="training images")
    p.add_argument("--validation", type=int, default=16, help="validation images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_demo_data)

    p = sub.add_parser("predict", help="write a mask per image with a trained model")
    p.add_argument("--model", required=True, help="model folder, model.tar.gz, s3://.../model.tar.gz, or an exported "
                                                  "model.onnx (onnxruntime, no torch) or TorchScript file")
    p.add_argument("--input", required=True, type=Path, help="an image, or a folder of images")
    p.add_argument("--output", required=True, type=Path, help="folder for <name>.png masks (<name>.tif for TIFFs above "
                                                                "2048x2048 and GeoTIFFs, read window by window)")
    p.add_argument("--probabilities", action="store_true", help="also write <name>.npy class probabilities (float16; "
                                                                "<name>_proba.tif, uint8 x 255, beside a .tif mask)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    p.add_argument("--tile", type=int, help="tile size in pixels (default: whole images up to 2048x2048)")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: average over 4 flips (flip) or also their transposes (d4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present; cpu for .onnx)")
    p.set_defaults(run=_predict)

    p = sub.add_parser("export", help="export a trained model to ONNX (runs on onnxruntime, no torch) or TorchScript",
                       description="Dynamic batch, height and width; the classes, normalization, stride and provenance "
                                   "travel inside the file. An architecture that cannot take a dynamic size is "
                                   "refused with the reason.")
    p.add_argument("--model", required=True, help="model folder, model.tar.gz, or s3://.../model.tar.gz")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--fp16", action="store_true",
                   help="fp16 weights and compute (float32 in and out; parity with torch within 2e-2)")
    p.add_argument("--output", required=True, type=Path, help="the file to write, e.g. model.onnx")
    p.set_defaults(run=_export)

    p = sub.add_parser("hyperparameters", help="list every hyperparameter with its default")
    p.set_defaults(run=_hyperparameters)
    return parser


def parse_hyperparameters(tokens: Sequence[str]) -> dict[str, str]:
    """`lr=0.01`, `--lr 0.01` and `--lr=0.01` alike; names may use - for _."""
    out: dict[str, str] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if not eq:
                if not tokens:
                    raise UnetsegError(f"hyperparameter --{key} needs a value")
                value = tokens.pop(0)
        else:
            key, eq, value = token.partition("=")
            if not eq:
                raise UnetsegError(f"unexpected argument {token!r}: give hyperparameters as key=value or --key value")
        out[key.replace("-", "_")] = value
    return out


def _split_layout(data: Path, validation: Optional[Path]) -> tuple[Path, Optional[Path]]:
    """The training and validation folders of --data, read as fit() and the container read a dataset root
    (contract/layout.py); --validation names the validation folder itself, so validation/ and val/ in --data are
    then left alone."""
    if not data.is_dir():
        return data, validation  # the data check says it is not there
    folders, files = folder_names(data)
    if validation is not None:
        folders = [name for name in folders if name not in VALIDATION_FOLDERS]
    layout = read_layout(folders, f"--data {data}", files)
    found = data / layout.validation if layout.validation else None
    return data / layout.train, validation or found


def _train(args, extra: Sequence[str]) -> int:
    cfg = TrainConfig.from_hyperparameters(parse_hyperparameters(extra))  # fails before torch is even imported
    if is_manifest(str(args.data)):  # a Ground Truth labelling job's output manifest, with local paths
        from .client.manifest_inputs import read_manifest

        manifest = read_manifest(str(args.data), lambda: None, cfg.label_attribute)
        print(manifest.summary())
        cfg = manifest.configure(cfg)
        train_dir = manifest.write_local_pairing(args.data, Path(tempfile.mkdtemp(prefix="unetseg-manifest-")))
        val_dir = args.validation
    else:
        train_dir, val_dir = _split_layout(args.data, args.validation)
    output = args.output or Path("runs") / time.strftime("unetseg-%Y%m%d-%H%M%S")
    check_output_folder(output, subfolders=RUN_FOLDERS)  # before the data check: not a failure after an epoch
    if args.mlflow_uri is not None:
        from .client.tracking import check_tracking_uri

        check_tracking_uri(args.mlflow_uri)
        os.environ[MLFLOW_TRACKING_URI_ENV] = args.mlflow_uri  # where the training loop and MLflow's client read it
    if args.mlflow_experiment:
        os.environ[MLFLOW_EXPERIMENT_ENV] = args.mlflow_experiment
    return _run_training(cfg, train_dir, val_dir, output, init_model=args.init_model)


RUN_FOLDERS = ("model", "checkpoints", "output")


def _run_training(cfg: TrainConfig, train_dir: Path, val_dir: Optional[Path], output: Path,
                  init_model: Optional[str] = None) -> int:
    from .atomic import WriteFailed
    from .training import RunPaths, train

    paths = RunPaths(train_dir, val_dir, output / "model", output / "checkpoints", output / "output", init_model)
    try:
        result = train(cfg, paths)
    except WriteFailed as exc:  # disk full, quota, read-only...: the file and the reason, and what to do
        raise OutputError(f"{exc}; free space (or choose another --output) and run the same command again: it "
                          "resumes from the last checkpoint written") from None
    if result.interrupted:
        print(f"interrupted; resume with the same command and --output {output}", file=sys.stderr)
        return stopped_exit_code(result.interrupted)
    return 0


# --- the output folder -----------------------------------------------------------------------------------------------

def check_output_folder(folder: Path, flag: str = "--output", subfolders: Sequence[str] = ()) -> None:
    """Raise one OutputError naming `folder` unless files can be written there: it (or, while it does not exist yet,
    its nearest existing parent) is a folder that takes a probe file. Creates nothing that stays."""
    for path in [folder, *(folder / name for name in subfolders)]:
        if path.exists() and not path.is_dir():
            where = f"{flag} {path}" if path == folder else f"{path} (inside {flag})"
            raise OutputError(f"{where} is a file, not a folder; give a folder (it is created if missing)")
    nearest = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not nearest.is_dir():
        raise OutputError(f"{flag} {folder}: {nearest} is a file, so the folder cannot be created there")
    for path in [nearest, *(folder / name for name in subfolders if (folder / name).is_dir())]:
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".unetseg-write-probe-"):
                pass
        except OSError as exc:
            raise OutputError(f"{flag} {folder}: cannot write in {path} ({write_failure_reason(exc.errno, exc)}); "
                              "choose another folder") from None


def _demo(args, _extra) -> int:
    from .synthetic import demo_hyperparameters, make_demo_dataset

    data = make_demo_dataset(args.output / "data", kind=args.kind)
    print(f"synthetic {args.kind} dataset: {data} ({TRAIN_CHANNEL}/, {VALIDATION_CHANNEL}/)")
    cfg = TrainConfig(**demo_hyperparameters(args.kind), epochs=args.epochs)
    shutil.rmtree(args.output / "run", ignore_errors=True)  # a fresh run each time: its checkpoint would resume
    return _run_training(cfg, data / TRAIN_CHANNEL, data / VALIDATION_CHANNEL, args.output / "run")


def _demo_data(args, _extra) -> int:
    from .synthetic import KINDS, demo_hyperparameters, make_demo_dataset

    make_demo_dataset(args.folder, kind=args.kind, train=args.train, validation=args.validation, size=args.size,
                      channels=args.channels, seed=args.seed)
    hps = demo_hyperparameters(args.kind, args.channels, args.size)
    print(f"wrote {args.train} training and {args.validation} validation images to {args.folder} "
          f"(classes: {', '.join(KINDS[args.kind])})")
    print("train on it with:\n  unetseg train --data " + str(args.folder) + " " +
          " ".join(f"{k}={v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in hps.items()
                   if v is not None) + " encoder_weights=none")
    return 0


def _predict(args, _extra) -> int:
    for flag, value in (("--tile", args.tile), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            hint = " of pixels, or leave it out" if flag == "--tile" else ""
            raise UsageError(f"{flag} {value}: give a positive number{hint}")
    from .predict import find_images, predict_files, resolve_device
    from .runtime import load_model, uses_torch

    device = resolve_device(args.device) if uses_torch(args.model) else args.device  # no torch for .onnx
    check_output_folder(args.output)
    images = find_images(args.input)
    model = load_model(args.model, device=device)
    if args.tile is not None and args.tile < model.stride:
        raise UsageError(f"--tile {args.tile}: smaller than the model's stride of {model.stride} pixels; give at least "
                         f"{model.stride} (tiles are rounded down to a multiple of it)")
    written = predict_files(model, images, args.output, probabilities=args.probabilities, overlays=args.overlay,
                            tile=args.tile, batch_size=args.batch_size, tta=args.tta)
    print(f"wrote {len(written)} mask(s) to {args.output} (classes: {', '.join(model.class_names)})")
    return 0


def _export(args, _extra) -> int:
    from .export import export_model

    if args.output.is_dir():
        raise OutputError(f"--output {args.output} is a folder; give the file to write, e.g. {args.output}/model.onnx")
    check_output_folder(args.output.parent)
    written = export_model(args.model, args.output, args.format, fp16=args.fp16)
    print(f"wrote {written} ({args.format}{', fp16' if args.fp16 else ''}, {written.stat().st_size / 2**20:.1f} MB)")
    return 0


def _hyperparameters(_args, _extra) -> int:
    rows = TrainConfig.describe_fields()
    width = max(len(r[0]) for r in rows)
    for name, default, text in rows:
        print(f"{name:<{width}}  {default:<12} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
