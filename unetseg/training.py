"""The training loop: plain PyTorch, one screen for the loop itself.

CUDA: AMP (bf16 where supported, else fp16 with a grad scaler), channels_last, cudnn.benchmark, optional
torch.compile, DDP. CPU: the same code in fp32. Every epoch: validation metrics, one log line, a checkpoint.
SIGTERM (spot interruption, StopTrainingJob) or Ctrl-C: checkpoint at the next step boundary, write the best model
so far, and stop; the next run with the same checkpoint dir continues exactly where this one stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import checkpoint, distributed, tracking
from .contract.config import TrainConfig
from .contract.errors import ConfigError
from .contract.metrics_log import SELECTION_METRIC, format_line
from .data import loader_workers
from .data.checks import CheckedDataset, check_dataset
from .data.dataset import EpochSampler, PadCollate, SegmentationDataset, ShardSampler, worker_init
from .data.masks import IGNORE_INDEX
from .data.scan import pair_channel, split_holdout
from .data.transforms import train_transform
from .distributed import DistContext, all_gather_objects, all_reduce
from .losses import build_loss, class_weights
from .metrics import confusion, summarize
from .model import (
    ARCHITECTURE_FIELDS,
    artifact_config,
    build_model,
    freeze_unused,
    load_matching,
    normalization,
    read_init_model,
    save_artifact,
)
from .segmenter import Segmenter, native_bf16, prepare_input
from .visualize import prediction_grid

# Changing these between runs makes a checkpoint unusable; changing the others (epochs, lr, ...) is allowed.
MODEL_SHAPING = (*ARCHITECTURE_FIELDS, "classes")


@dataclass(frozen=True)
class RunPaths:
    train: Path
    validation: Optional[Path]
    model_dir: Path
    checkpoint_dir: Path
    output_data_dir: Path
    init_model: Optional[Path | str] = None  # a trained unetseg model to start from (fine-tuning)


@dataclass
class TrainResult:
    history: list[dict]
    best: dict
    interrupted: Optional[str] = None  # the signal's name when stopped by one


class Interrupted(Exception):
    """Training stopped on a signal after saving its checkpoint."""


def train(cfg: TrainConfig, paths: RunPaths, *, progress: Optional[bool] = None) -> TrainResult:
    ctx = distributed.init_process()
    try:
        return _train(cfg, paths, ctx, progress=sys.stderr.isatty() if progress is None else progress)
    finally:
        distributed.shutdown(ctx)


@dataclass(frozen=True)
class Run:
    """What the steps of one training run share: built once by _train, read by the loop, evaluate and finish."""
    cfg: TrainConfig
    ctx: DistContext
    raw_model: torch.nn.Module  # the bare model (not the DDP / torch.compile wrapper): its weights are the artifact's
    loss_fn: torch.nn.Module
    norm: dict  # what the model expects of its input (model.normalization)
    amp_dtype: Optional[torch.dtype]  # None: fp32
    channels_last: bool
    config: dict  # the artifact's config.json less the best epoch: what a Segmenter of this model reads
    say: Callable[..., None] = print  # rank 0's print; a no-op on the other ranks
    paths: Optional[RunPaths] = None

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def forward(self, model: torch.nn.Module, images: torch.Tensor,
                masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, labels, loss) of a batch from the loader: the one forward pass of training and evaluation."""
        x = prepare_input(images.to(self.device, non_blocking=True), self.norm)
        x = x if self.channels_last else x.contiguous()  # prepare_input's permute already leaves NHWC memory
        y = masks.to(self.device, non_blocking=True).long()
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
            logits = model(x)
        # The loss in fp32, outside autocast: a softmax and a sum over every pixel lose too much in bf16 or fp16.
        return logits, y, self.loss_fn(logits.float(), y)


def _train(cfg: TrainConfig, paths: RunPaths, ctx: DistContext, progress: bool) -> TrainResult:
    say = print if ctx.is_main else (lambda *a, **k: None)
    device = ctx.device
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(cfg, device, say)
    # A checkpoint (this run, resumed) wins over init_model; either makes pretrained encoder weights moot. Both are
    # read and checked before the data: a wrong path or a damaged checkpoint should not wait for a long data check.
    state = checkpoint.load_state(paths.checkpoint_dir)
    init_state = read_init_model(paths.init_model, cfg) if paths.init_model is not None and state is None else None
    if state is not None and paths.init_model is not None:
        say(f"init model {paths.init_model} not used: resuming from {paths.checkpoint_dir / checkpoint.LAST}, which "
            "holds what this run has trained so far")

    # --- data -----------------------------------------------------------------------------------------------------
    workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(device, ctx.local_world_size)
    train_data, val_data = load_datasets(cfg, paths, ctx, say, copies=loader_workers.copies_per_process(workers))
    sampler = EpochSampler(len(train_data.samples), cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size)
    train_loader, val_loader, tiled = build_loaders(cfg, train_data, val_data, sampler, workers, ctx)
    steps_per_epoch = sampler.batches_per_epoch
    trained_on = {"train": train_data.fingerprint(), "validation": val_data.fingerprint(),
                  "steps_per_epoch": steps_per_epoch, "processes": ctx.world_size}

    # --- model, optimizer, schedule ---------------------------------------------------------------------------------
    channels_last = cfg.channels_last and device.type == "cuda"
    raw_model = build_run_model(cfg, init_state, paths.init_model, pretrained=state is None and init_state is None,
                                say=say)
    raw_model = raw_model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = build_optimizer(cfg, raw_model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # bf16 and fp32 need no scaling
    weights = class_weights(cfg.class_weights, train_data.class_pixels)
    if weights is not None:
        say("class weights (cross-entropy): "
            + ", ".join(f"{n} {w:g}" for n, w in zip(cfg.resolved_class_names, weights)))
    norm = normalization(cfg, train_data.band_stats)  # band_stats: measured by the data check, where asked for
    run = Run(cfg=cfg, ctx=ctx, raw_model=raw_model, loss_fn=build_loss(cfg.loss, weights).to(device), norm=norm,
              amp_dtype=amp_dtype, channels_last=channels_last, say=say, paths=paths,
              config=artifact_config(cfg, train_data.codec.mode, init_model=_provenance(paths), norm=norm))

    # --- resume -----------------------------------------------------------------------------------------------------
    start_epoch, start_batch, step, history, best, epoch_sums = 0, 0, 0, [], {}, new_epoch_sums()
    if state is not None:
        start_epoch, start_batch, step, history, best, epoch_sums = restore(
            state, run, optimizer, scheduler, scaler, trained_on)
    tracker = tracking.start(cfg, paths, train_data, val_data, history) if ctx.is_main else tracking.NO_TRACKING

    # What the step calls. Wrapped after the restore: DDP broadcasts rank 0's weights when it is built.
    model = (DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
             if ctx.distributed else raw_model)
    model = torch.compile(model) if cfg.compile else model

    def snapshot(epoch: int, batch: int) -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch,
                "step": step, "history": history, "best": best, "partial": epoch_sums,
                "hyperparameters": cfg.to_hyperparameters(), "data": trained_on}

    def sums_over_ranks(loss_sum: torch.Tensor) -> torch.Tensor:
        """(loss sum, samples) of this epoch so far, over all ranks."""
        return all_reduce(torch.stack([loss_sum, torch.tensor(float(epoch_sums["samples"]), device=device)]), ctx)

    say(f"training {cfg.arch}/{cfg.encoder} for {cfg.epochs} epochs x {steps_per_epoch} steps on "
        f"{ctx.world_size} x {device.type}, batch {cfg.batch_size} per process, "
        f"precision {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'fp32'}, "
        f"{loader_workers.describe(workers)}")
    stop = StopSignal()
    epochs_without_gain = history[-1]["epoch"] - best["epoch"] if best else 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # --- train one epoch ----------------------------------------------------------------------------------
            sampler.set_epoch(epoch, start_batch)
            raw_model.train()
            started = time.perf_counter()
            loss_sum = torch.tensor(epoch_sums["loss_sum"], device=device)
            batches = train_loader
            if progress and ctx.is_main:
                batches = progress_bar(train_loader, epoch, cfg.epochs, start_batch, steps_per_epoch)
            for batch_index, (images, masks) in enumerate(batches, start=start_batch):
                _, _, loss = run.forward(model, images, masks)
                scaler.scale(loss).backward()
                if cfg.grad_clip_norm:
                    scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip_norm)
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed; update() then lowers the scale
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                loss_sum += loss.detach() * len(images)  # summed on the device: loss.item() would sync every step
                epoch_sums["samples"] += len(images)
                if cfg.log_every and step % cfg.log_every == 0:
                    say(format_line({"step_loss": loss.item()}, step=step, epoch=epoch + 1), flush=True)  # a sync
                # A collective call (an all-reduce every CHECK_EVERY steps): every rank makes it at every step, or
                # the others wait in it; so a signal to one rank stops all of them at the same step.
                if stop.agreed(ctx, step):
                    sums = sums_over_ranks(loss_sum)
                    epoch_sums.update(loss_sum=float(sums[0]), samples=int(sums[1]),
                                      seconds=epoch_sums["seconds"] + time.perf_counter() - started)
                    if ctx.is_main:
                        checkpoint.save_state(paths.checkpoint_dir, snapshot(epoch, batch_index + 1))
                    say(f"stopping on {stop.name} at epoch {epoch + 1}, batch {batch_index + 1}: "
                        f"{resume_hint(paths)}", flush=True)
                    raise Interrupted(stop.name)

            # --- validate, log, checkpoint ------------------------------------------------------------------------
            train_seconds = epoch_sums["seconds"] + time.perf_counter() - started
            totals = sums_over_ranks(loss_sum)
            metrics = {"train_loss": float(totals[0] / totals[1].clamp_min(1))}
            # Each rank's last forward pass updated its own BatchNorm statistics (DDP copies rank 0's at the start of
            # a forward pass, not after): evaluate with rank 0's, the ones that the checkpoint and the artifact keep.
            distributed.broadcast_buffers(raw_model, ctx)
            metrics.update(evaluate(run, val_loader, large=(val_data.load(i) for i in tiled)))
            metrics.update(lr=scheduler.get_last_lr()[0], epoch_time=epoch_sums["seconds"] + time.perf_counter()
                           - started, images_per_sec=float(totals[1]) / max(train_seconds, 1e-9))
            history.append({"epoch": epoch + 1, "step": step, **metrics})
            start_batch, epoch_sums = 0, new_epoch_sums()
            improved = not best or metrics[SELECTION_METRIC] > best[SELECTION_METRIC]
            if improved:
                best = {"epoch": epoch + 1, SELECTION_METRIC: metrics[SELECTION_METRIC]}
            epochs_without_gain = 0 if improved else epochs_without_gain + 1
            if ctx.is_main:
                if improved:
                    checkpoint.save_best(paths.checkpoint_dir, raw_model.state_dict())
                checkpoint.save_state(paths.checkpoint_dir, snapshot(epoch + 1, 0))
            say(format_line(metrics, epoch=epoch + 1), flush=True)
            tracker.log_epoch(history[-1])
            if cfg.early_stopping_patience and epochs_without_gain >= cfg.early_stopping_patience:
                say(f"early stopping: no better {SELECTION_METRIC} for {epochs_without_gain} epochs (best {best})")
                break
            if stop.agreed(ctx, step, force=True):  # collective too; the epoch's checkpoint is already saved
                say(f"stopping on {stop.name} after epoch {epoch + 1}: {resume_hint(paths)}", flush=True)
                raise Interrupted(stop.name)
    except Interrupted:
        if ctx.is_main and history:  # the model only: SageMaker's SIGKILL is coming, and the picture can wait
            finish(run, val_data, history, best, picture=False, tracker=tracker)
        distributed.barrier(ctx)
        return TrainResult(history, best, interrupted=stop.name)
    finally:
        stop.restore()

    if ctx.is_main:
        finish(run, val_data, history, best, tracker=tracker)
    # Every rank waits for rank 0's artifacts: a container that exits first can end the job with an empty model.
    distributed.barrier(ctx)
    return TrainResult(history, best)


# --- pieces of the loop ----------------------------------------------------------------------------------------

def resume_hint(paths: RunPaths) -> str:
    """What a stop says after its checkpoint is written."""
    return (f"checkpoint saved to {paths.checkpoint_dir / checkpoint.LAST}; run again with the same checkpoint dir to "
            "resume")


def new_epoch_sums() -> dict:
    """The running sums of an epoch: a checkpoint taken inside one carries them, so that its train_loss, epoch_time
    and images_per_sec count the whole epoch after a resume."""
    return {"loss_sum": 0.0, "samples": 0, "seconds": 0.0}


def build_loaders(cfg: TrainConfig, train_data: CheckedDataset, val_data: CheckedDataset, sampler: EpochSampler,
                  workers: int, ctx: DistContext) -> tuple[DataLoader, DataLoader, list[int]]:
    """(training loader, validation loader, indices of the validation images scored in tiles). Validation images
    above the size that predict tiles are scored tile by tile, as predict scores them, by each rank for its shard;
    the others in batches."""
    device = ctx.device
    loader_args = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                       persistent_workers=workers > 0, collate_fn=PadCollate(cfg.stride),
                       multiprocessing_context=loader_workers.context(workers))
    augmented = SegmentationDataset(train_data, train_transform(cfg.augment, cfg.image_size, cfg.in_channels), cfg.seed)
    train_loader = DataLoader(augmented, batch_size=cfg.batch_size, sampler=sampler, **loader_args)
    tiled = [i for i in ShardSampler(len(val_data.samples), ctx.rank, ctx.world_size) if is_tiled(val_data.sizes[i])]
    val_loader = DataLoader(SegmentationDataset(val_data), batch_size=val_batch_size(cfg, val_data),
                            sampler=ShardSampler(len(val_data.samples), ctx.rank, ctx.world_size, skip=tiled),
                            **loader_args)
    return train_loader, val_loader, tiled


def build_run_model(cfg: TrainConfig, init_state: Optional[dict], init_model, pretrained: bool,
                    say) -> torch.nn.Module:
    """The model to train, on the CPU: fresh (with pretrained encoder weights when `pretrained`), or with the tensors
    of a fine-tuning source (`init_state`, read from `init_model`) that fit it."""
    model = build_model(cfg, pretrained=pretrained)
    if init_state is not None:
        copied, fresh = load_matching(model, init_state)
        some = ", ".join(fresh[:4]) + (", ..." if len(fresh) > 4 else "")
        say(f"initialized from {init_model}: {copied} tensors"
            + (f"; {len(fresh)} start fresh ({some})" if fresh else ""))
    freeze_unused(model, cfg.in_channels, cfg.stride)
    return model


def progress_bar(loader: DataLoader, epoch: int, epochs: int, done: int, total: int):
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, initial=done, total=total, dynamic_ncols=True)


def _provenance(paths: RunPaths) -> Optional[str]:
    return str(paths.init_model) if paths.init_model else None


@torch.inference_mode()
def evaluate(run: Run, loader, large: Iterable[tuple[np.ndarray, np.ndarray]] = ()) -> dict[str, float]:
    """Metrics over every rank's validation shard: the loader's images in batches, then the `large` ones (image, mask),
    one at a time, tiled as predict tiles them. Runs the bare model, not the DDP wrapper (see
    distributed.broadcast_buffers): a shard may be empty when there are fewer images than processes."""
    model, device, classes = run.raw_model, run.device, run.cfg.classes
    model.eval()
    matrix = torch.zeros(classes, classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for images, masks in loader:
        logits, y, loss = run.forward(model, images, masks)
        loss_sum += loss * len(images)
        count += len(images)
        matrix += confusion(logits.argmax(1), y, classes)
    segmenter = None
    for image, mask in large:
        segmenter = segmenter or Segmenter(model, run.config, device=device)
        loss, counts = score_tiled(segmenter, image, mask, run.loss_fn, classes)
        loss_sum += loss
        count += 1
        matrix += counts
    all_reduce(matrix, run.ctx)
    totals = all_reduce(torch.stack([loss_sum, count]), run.ctx)
    model.train()
    return {"val_loss": float(totals[0] / totals[1].clamp_min(1)),
            **summarize(matrix.cpu(), run.cfg.resolved_class_names)}


def is_tiled(size: tuple[int, int]) -> bool:
    """Whether validation scores an image of `size` (height, width) in tiles: above the size predict tiles."""
    return size[0] * size[1] > Segmenter.max_pixels


def score_tiled(segmenter: Segmenter, image: np.ndarray, mask: np.ndarray, loss_fn,
                classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, confusion matrix) of one image scored as predict scores it: blended tiles, band by band
    (Segmenter.blended_bands), so that memory follows the tile and the image width, not the image's size.

    The loss is that of the blended probabilities, with their logarithm as logits (exact for ce and dice, which take a
    softmax of them), averaged over the bands by labelled pixels: overlapping tiles have no one logit per pixel."""
    matrix = torch.zeros(classes, classes, dtype=torch.int64, device=segmenter.device)
    loss_sum, labelled = torch.zeros((), device=segmenter.device), 0
    target = torch.from_numpy(mask)
    for top, probs in segmenter.blended_bands(image):
        y = target[top:top + probs.shape[1]].to(segmenter.device).long()
        matrix += confusion(probs.argmax(0), y, classes)
        pixels = int((y != IGNORE_INDEX).sum())
        if pixels:
            loss_sum += loss_fn(probs.clamp_min(1e-8).log()[None], y[None]) * pixels
            labelled += pixels
    return loss_sum / max(1, labelled), matrix


def finish(run: Run, val_data: CheckedDataset, history: list, best: dict, picture: bool = True,
           tracker=tracking.NO_TRACKING) -> None:
    """Rank 0: the best weights, config and history to the model dir; then, with `picture` (not on a stop), a picture
    of predictions to the output dir, and model.onnx beside the weights when export_onnx asks for it; then, within a
    deadline, all of it to the tracking server."""
    paths, say = run.paths, run.say
    weights = checkpoint.load_best(paths.checkpoint_dir) or run.raw_model.state_dict()
    config = {**run.config, "best": best or {}, **tracker.config_fields()}
    save_artifact(paths.model_dir, weights, config, history)
    if run.cfg.export_onnx and picture:
        export_onnx(paths.model_dir, say)
    drawn = paths.output_data_dir / "predictions.png" if picture else None
    if drawn:
        try:
            draw_predictions(run.raw_model, weights, config, val_data, drawn)
        except Exception as exc:  # noqa: BLE001 - a picture is a convenience, never a reason to fail a trained job
            say(f"could not draw {drawn}: {exc}")
            drawn = None
    # No "name=value" here: SageMaker's metric regexes would read this summary as one more data point.
    say(f"best model: epoch {best.get('epoch')}, {SELECTION_METRIC} {best.get(SELECTION_METRIC, float('nan')):.4f}")
    say(f"model: {paths.model_dir} (model.safetensors, config.json)")
    say(f"metrics: {paths.model_dir / 'history.json'}")
    if drawn:
        say(f"predictions: {drawn}")
    tracker.finish(paths.model_dir, drawn, best=best, stopped=not picture)


def export_onnx(model_dir: Path, say) -> None:
    """model.onnx from the artifact just written; a model that cannot be exported keeps its job a success."""
    from .export import ExportRefused, export_model
    from .runtime_onnx import ONNX_FILE

    try:
        export_model(model_dir, model_dir / ONNX_FILE)
        say(f"onnx: {model_dir / ONNX_FILE}")
    except ExportRefused as exc:
        say(f"no {ONNX_FILE} (export_onnx): {exc}")


PICTURE_CROP = 256  # px: the picture shows each image's centre; the other ranks wait in a barrier while it is drawn


def draw_predictions(model, weights, config: dict, data: CheckedDataset, path: Path, count: int = 4) -> None:
    """Predictions of the best weights on the centres of a few validation images, on the training device (training
    is over: `model` takes the best weights)."""
    model.load_state_dict(weights)
    segmenter = Segmenter(model, config, device=next(model.parameters()).device)
    rows = []
    for index in range(min(count, len(data.samples))):
        image, mask = centre_crop(*data.load(index), PICTURE_CROP)
        rows.append((image, mask, segmenter.predict(image)))
    path.parent.mkdir(parents=True, exist_ok=True)
    prediction_grid(rows, config["class_colors"]).save(path)


def centre_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    top, left = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
    return image[top:top + size, left:left + size], mask[top:top + size, left:left + size]


def load_datasets(cfg: TrainConfig, paths: RunPaths, ctx: DistContext, say,
                  copies: int = 1) -> tuple[CheckedDataset, CheckedDataset]:
    """Pair, check and (when they fit) cache train and validation; one mask convention for both. `copies`: of each
    process's data in memory (loader workers that hold their own: data/loader_workers.py)."""
    train = pair_channel(paths.train)
    if paths.validation is not None:
        val = pair_channel(paths.validation)
        where = f"validation channel {paths.validation}"
    else:
        train, val = split_holdout(train, cfg.val_fraction, cfg.seed)
        where = f"{len(val)} held out of {paths.train} (val_fraction={cfg.val_fraction})"
    # Each process reads (and keeps) the shard its samplers will give it: index % world within train and within val.
    # Validation images large enough to be tiled are read when validated, one at a time, and never kept: one of them
    # could outweigh the rest of the dataset and leave it all uncached.
    owners = [i % ctx.world_size for i in range(len(train))] + [j % ctx.world_size for j in range(len(val))]
    checked = check_dataset(train + val, cfg, cache_share=ctx.local_world_size * copies, rank=ctx.rank, owners=owners,
                            gather=partial(all_gather_objects, ctx=ctx),
                            uncached=lambda i, size: i >= len(train) and is_tiled(size))
    train_data = checked.subset(range(len(train)))
    val_data = checked.subset(range(len(train), len(train) + len(val)))
    large = sum(map(is_tiled, val_data.sizes))
    if large:
        side = math.isqrt(Segmenter.max_pixels)
        where += (f"; {large} image(s) over {side}x{side} validated in {Segmenter.default_tile} px tiles as predict "
                  "tiles them, read from disk each time")
    share = train_data.class_pixels / max(1, train_data.class_pixels.sum())
    balance = ", ".join(f"{n} {p:.1%}" for n, p in zip(cfg.resolved_class_names, share))
    kept = "read from disk" if checked.cached is None else (
        "cached in memory" + (f", each of {ctx.world_size} processes its own shard" if ctx.distributed else ""))
    say(f"data: {len(train)} training images from {paths.train}; validation: {where}; masks: {checked.codec.mode}; "
        f"{kept}; class pixels: {balance}")
    return train_data, val_data


def autocast_dtype(cfg: TrainConfig, device: torch.device, say) -> Optional[torch.dtype]:
    if device.type != "cuda" or cfg.amp == "off":
        if cfg.amp in ("bf16", "fp16") and device.type != "cuda":
            say(f"amp={cfg.amp} applies to CUDA only; training in fp32 on {device.type}")
        return None
    if cfg.amp == "bf16" or (cfg.amp == "auto" and native_bf16(device)):
        if not native_bf16(device):
            raise ConfigError(f"hyperparameter 'amp' = 'bf16': {torch.cuda.get_device_name(device)} has no bf16 "
                              f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, "
                              f"8.0 needed); use fp16 or auto")
        return torch.bfloat16
    return torch.float16


def auto_workers(device: torch.device, local_world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) // max(1, local_world)
    if device.type == "cuda":
        return max(2, min(8, cpus - 1))
    return min(2, cpus // 4)  # on CPU the model needs the cores; decoding is mostly cached anyway


def val_batch_size(cfg: TrainConfig, data: CheckedDataset) -> int:
    """Validation runs on whole images up to the tiled ones' size: scale the batch down by how much larger they are
    than a crop."""
    largest = max((h * w for h, w in data.sizes if not is_tiled((h, w))), default=1)
    return max(1, min(cfg.batch_size, int(cfg.batch_size * cfg.image_size**2 / largest)))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on norms and biases: decaying them only fights the normalization.
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, fused=device.type == "cuda")


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """Multiplier of the peak learning rate at each optimizer step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if cfg.scheduler == "onecycle":  # 30% cosine ramp from lr/25, then cosine to lr/1e4
            peak = max(1, int(0.3 * total))
            if step < peak:
                return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / peak)) / 2
            t = min(1.0, (step - peak) / max(1, total - peak))
            return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * t)) / 2
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.scheduler == "cosine":
            return (1 + math.cos(math.pi * t)) / 2
        if cfg.scheduler == "poly":
            return (1 - t) ** 0.9
        return 1.0

    return factor


def check_resumable(cfg: TrainConfig, saved_hps: dict, where: Path, say) -> None:
    saved = TrainConfig.from_hyperparameters(saved_hps)
    clash = saved.compare(cfg, MODEL_SHAPING)
    if clash:
        raise ConfigError(
            f"{where / checkpoint.LAST} was trained with a different model ("
            + ", ".join(f"{k}: {theirs} there, {ours} now" for k, theirs, ours in clash)
            + "); use a fresh checkpoint location (checkpoint_s3_uri / --output) or the original hyperparameters"
        )
    changed = [k for k, _, _ in saved.compare(cfg)]
    if changed:
        say(f"resuming with changed hyperparameters: {', '.join(changed)}")


def resume_position(state: dict, now: dict, epochs: int, say) -> tuple[int, int, int]:
    """(epoch, batch within it, optimizer step) at which a run resumed from `state` continues; `now` is this run's
    record of its data (see `trained_on`). One line says what changed since the checkpoint.

    On the same data, steps per epoch and processes: exactly where the checkpoint stopped. The learning-rate schedule
    is a function of the step, built for this run's steps per epoch; resumed at the old step after these changed (the
    training set shrank or grew, another batch_size or process count), it had passed its end (lr=0 for the rest of
    training) or had much of it still ahead. So the position is re-expressed in epochs: the run continues at the same
    fraction of training, the step renumbered as epoch x steps per epoch + batch. Inside an epoch this cannot be
    exact: the epoch's order over the new data is another one, so its rest is the new order's rest from the same
    fraction on, which may repeat some images of the epoch and leave out others; the epochs after it are whole.
    Other files with the same count, or another validation set, keep the position: they are said, as the run is then
    no replay of an uninterrupted one, and the best epoch so far was scored on the old validation images."""
    epoch, batch, step = state["epoch"], state["batch"], state["step"]
    then = state.get("data")
    if then is None:  # written before checkpoints recorded their data: nothing to compare with
        return epoch, batch, step
    changes = []
    for role, noun, note in (("train", "training", ""),
                             ("validation", "validation", " (the best epoch so far was scored on the old ones)")):
        old, new = then[role], now[role]
        if old["images"] != new["images"]:
            changes.append(f"{old['images']} {noun} images then, {new['images']} now{note}")
        elif old["files"] != new["files"]:
            changes.append(f"the {new['images']} {noun} images are not the same files (names or sizes differ){note}")
    if then["processes"] != now["processes"]:
        changes.append(f"{then['processes']} processes then, {now['processes']} now")
    before, after = then["steps_per_epoch"], now["steps_per_epoch"]
    if before != after:
        moved = round(batch * after / before)
        done = (epoch + batch / before) / max(1, epochs)
        change = (f"steps per epoch {before} -> {after}: the learning-rate schedule continues from the same point of "
                  f"training ({done:.0%} done), step {epoch * after + moved} (was {step})")
        if batch:
            change += (f", batch {moved} of {after} of epoch {epoch + 1} (was {batch} of {before}); the rest of this "
                       "epoch follows the new data's order, so it may repeat some of its images and leave out others")
        changes.append(change)
        batch, step = moved, epoch * after + moved
    if changes:
        say("resuming with changes since the checkpoint: " + "; ".join(changes))
    return epoch, batch, step


def restore(state: dict, run: Run, optimizer, scheduler, scaler, trained_on: dict) -> tuple[int, int, int, list,
                                                                                          dict, dict]:
    """Continue from a checkpoint, in one step: check that it trained this model (check_resumable), find where to
    continue (resume_position), put back the random generators and what the run learnt (load_learnt). Returns
    (epoch, batch within it, optimizer step, history, best, the epoch's running sums)."""
    cfg, where = run.cfg, run.paths.checkpoint_dir
    check_resumable(cfg, state["hyperparameters"], where, run.say)
    epoch, batch, step = resume_position(state, trained_on, cfg.epochs, run.say)
    state["scheduler"] = {**state["scheduler"], "last_epoch": step}  # the schedule's position: the step
    checkpoint.restore_rng(state)
    load_learnt(state, run.raw_model, optimizer, scheduler, scaler, run.say)
    epoch_sums = dict(state["partial"])
    if not run.ctx.is_main:  # the partial epoch's sums are over all ranks (see the stop in _train): rank 0 has them
        epoch_sums.update(loss_sum=0.0, samples=0)
    run.say(f"resumed from {where / checkpoint.LAST}: epoch {epoch + 1}, batch {batch}, step {step}")
    return epoch, batch, step, list(state["history"]), dict(state["best"]), epoch_sums


def load_learnt(state: dict, model, optimizer, scheduler, scaler, say) -> None:
    """Load a checkpoint into the parts built for this run. What the run learnt (weights, optimizer moments, the
    schedule's position, the grad scale) comes from the checkpoint; how this run trains (its hyperparameters, fused or
    not, memory layout, precision) stays as built, so that each change check_resumable allows works."""
    model.load_state_dict(state["model"])
    adapted = []
    saved = TrainConfig.from_hyperparameters(state["hyperparameters"]).optimizer
    now = type(optimizer).__name__.lower()  # build_optimizer's classes carry the config's names
    if saved != now:
        adapted.append(f"the checkpoint's {saved} optimizer state does not fit {now}: {now} starts fresh")
    else:
        # The checkpoint's groups with this run's settings: load_state_dict places the state by them (fused AdamW keeps
        # its step counts on the parameters' device) and would otherwise keep the checkpoint's fused, lr, decay...
        groups = [(old, {k: v for k, v in new.items() if k != "params"})
                  for old, new in zip(state["optimizer"]["param_groups"], optimizer.param_groups)]
        optimizer.load_state_dict({**state["optimizer"], "param_groups": [{**old, **new} for old, new in groups]})
        changed = sorted({f"{k}={new[k]} (was {old.get(k)})" for old, new in groups
                          for k in ("fused", "foreach", "capturable") if k in new and old.get(k) != new[k]})
        relaid = 0
        for param, moments in optimizer.state.items():  # fused kernels read a parameter and its moments as flat memory
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
                    relaid += 1
        adapted += [f"optimizer {', '.join(changed)}"] if changed else []
        adapted += [f"{relaid} optimizer tensors to the parameters' memory layout"] if relaid else []
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = base_lrs  # this run's peak learning rate, at the checkpoint's position in the schedule
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # as LambdaLR computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what an epoch without a step logs
    if scaler.is_enabled() and not state["scaler"]:
        adapted.append("a fresh grad scaler for fp16 (the checkpoint trained without one)")
    else:
        scaler.load_state_dict(state["scaler"])
    if adapted:
        say("resume adapted: " + "; ".join(adapted))


class StopSignal:
    """SIGTERM (SageMaker stop, spot reclaim) and SIGINT (Ctrl-C) ask the loop to stop at a step boundary.

    With several processes, the ranks must stop at the same step: every few steps they agree by all-reduce.
    """

    CHECK_EVERY = 10  # steps between agreements across ranks: a sync point, so not every step

    def __init__(self):
        self.name: Optional[str] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): no signal handling
                pass

    def _handle(self, signum, _frame) -> None:
        self.name = signal.Signals(signum).name

    def agreed(self, ctx: DistContext, step: int, force: bool = False) -> bool:
        if not ctx.distributed:
            return self.name is not None
        if not force and step % self.CHECK_EVERY:
            return False
        flag = torch.full((1,), 1.0 if self.name else 0.0, device=ctx.device)  # a fill, not a copy from the host
        stop = bool(all_reduce(flag, ctx, op=torch.distributed.ReduceOp.MAX).item())  # the one sync, every 10 steps
        if stop and self.name is None:
            self.name = "SIGTERM"  # another rank got it
        return stop

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
