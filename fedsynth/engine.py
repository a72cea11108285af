"""The one training loop. Local CLI, DDP workers, Flower clients and OpenFL collaborators all
drive a model through :class:`Engine`; none of them writes a loop of its own.

The engine owns: epochs/steps, validation, checkpoints (``last``/``best``), resume, logging
(progress bar, ``metrics.csv``, TensorBoard) and PNG sample grids. Everything optional runs
through :mod:`fedsynth.extensions` hooks (differential privacy swaps the optimizers and loader
for private ones; the EMA updates after each step and supplies the sampling weights), so the
loop has no branch for any of them.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedsynth.checkpoint import (
    TrainingState,
    capture_augmentation_state,
    capture_rng,
    check_finite_weights,
    config_changes,
    load_checkpoint,
    preserved_rng,
    restore_augmentation_state,
    restore_rng,
    save_checkpoint,
)
from fedsynth.commands import wall_time
from fedsynth.config import ExperimentConfig
from fedsynth.data.dataset import ImageDataset, make_loader
from fedsynth.data.images import save_image
from fedsynth.data.manifest import fingerprint, fingerprint_changes
from fedsynth.errors import CheckpointError, ConfigError, TrainingDiverged, WeightsError
from fedsynth.extensions import EmaExtension, Extension, TrainingStep, sampling_weights
from fedsynth.families import first_stage
from fedsynth.generation import image_grid, sample
from fedsynth.io import atomic_path, remove_stale_temps
from fedsynth.models import build_model
from fedsynth.models.base import Batch, SynthesisModel
from fedsynth.privacy.lifetime import DatasetLedger, check_non_private
from fedsynth.processes import host_memory_available
from fedsynth.progress import bar as progress_bar
from fedsynth.progress import network_label
from fedsynth.recipes import WeightAverage, lr_factor

LAST = "last.ckpt"
BEST = "best.ckpt"


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torch.distributed job (world_size 1 = no DDP)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, rank: int = 0) -> torch.device:
    """``auto``: a CUDA GPU when torch sees one, else the CPU; ``cuda`` without a GPU is a :class:`ConfigError`."""
    if choice == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"device cuda: torch {torch.__version__} ({build}) sees no CUDA GPU on this machine; "
                          "use device auto (GPU when there is one) or cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


#: bytes per trainable parameter while training: weights, gradients, Adam's two moments, the EMA copy (fp32)
TRAINING_BYTES_PER_PARAMETER = 5 * 4


def check_model_fits(config: ExperimentConfig, device: torch.device) -> None:
    """Refuse a model whose parameters alone (weights, gradients, Adam, EMA) cannot fit in the memory
    the device has, before anything is allocated (counted on PyTorch's ``meta`` device). Activations
    come on top: ``fedsynth validate`` measures them."""
    if first_stage(config) is not None:  # its first stage was checked when it trained; its UNet is the small part
        return
    try:
        with torch.device("meta"):
            model = build_model(config)
    except Exception:  # a network that cannot be built on the meta device: the real build reports it
        return
    count = sum(p.numel() for p in model.parameters())
    need = count * TRAINING_BYTES_PER_PARAMETER
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        have, where = host_memory_available(), "available on this machine"
    if need > have:
        raise ConfigError(f"the {config.family} model of this config has {count:,} parameters: training it needs at "
                          f"least {need / 2**30:.1f} GiB (weights, gradients, Adam, EMA), but {have / 2**30:.1f} GiB are "
                          f"{where}; make the model narrower (model.*channels) or image_size smaller")


class Engine:
    """Trains, validates, samples and checkpoints one :class:`SynthesisModel`."""

    def __init__(
        self,
        model: SynthesisModel,
        config: ExperimentConfig,
        *,
        run_dir: str | Path | None = None,
        dist: Distributed = Distributed(),
        device: torch.device | None = None,
        privacy: Extension | None = None,
        extensions: list[Extension] | None = None,
        ledger: DatasetLedger | None = None,
        driver: str = "local",
    ) -> None:
        """``privacy`` (e.g. :func:`fedsynth.privacy.make_privacy_plugin`) and ``extensions`` run
        through the loop's hooks in that order, then the EMA of ``training.ema_decay``. With the
        site's lifetime ``ledger`` (:mod:`fedsynth.privacy.lifetime`) every fit is checked against
        its budget and recorded in it under this run folder's name and ``driver``."""
        self.config = config
        self.dist = dist
        self.device = device or resolve_device(config.training.device, dist.rank)
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.state = TrainingState()
        self.optimizers = model.configure_optimizers(config.training)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self._clip_hooks: dict[str, Any] = {}
        self.extensions: list[Extension] = [*([privacy] if privacy is not None else []), *(extensions or [])]
        if config.training.ema_decay > 0 and model.generating_groups():
            self.extensions.append(EmaExtension(WeightAverage(self.model, model.generating_groups(),
                                                              config.training.ema_decay)))
        self.planned_steps: int | None = None
        #: what this engine trains, as its progress bar and log lines name it (a driver may set it,
        #: e.g. ``first stage (autoencoder)``)
        self.stage_label: str = network_label(config.family)
        self._bar: Any = None
        self._target_epochs = config.training.epochs
        self._fit_started: float | None = None
        self._pending_rng: Mapping[str, Any] | None = None  # RNG of a resumed checkpoint, restored by fit
        self._data_fingerprint: dict[str, Any] | None = None  # of the training set, stored in checkpoints
        self._resumed_data: dict[str, Any] | None = None  # the fingerprint a resumed checkpoint holds
        self._fingerprinted: ImageDataset | None = None
        self._training_step: TrainingStep = model.training_step
        self.ledger, self.driver = ledger, driver
        self._tb: Any = None
        if dist.world_size > 1:
            self._wrap_ddp()
        if self.writes and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.run_dir)  # left by a killed process's atomic writes

    # ------------------------------------------------------------------ setup

    def extension(self, state_key: str) -> Extension | None:
        """The extension keeping its state under ``state_key`` (``"privacy"``, ``"ema"``), if any."""
        return next((e for e in self.extensions if e.state_key == state_key), None)

    @property
    def privacy(self) -> Any:
        """The privacy extension (``None`` without DP)."""
        return self.extension("privacy")

    @property
    def ema(self) -> WeightAverage | None:
        """The weight average of the generating groups (``None`` when ``training.ema_decay`` is 0)."""
        ext = self.extension("ema")
        return ext.average if isinstance(ext, EmaExtension) else None

    @property
    def writes(self) -> bool:
        return self.dist.is_main and self.run_dir is not None

    def _wrap_ddp(self) -> None:
        ids = [self.device.index] if self.device.type == "cuda" else None
        for name in self.model.trainable_net_names():
            self.model.nets[name] = torch.nn.parallel.DistributedDataParallel(self.model.nets[name], device_ids=ids)

    def loader(self, dataset: ImageDataset, *, train: bool) -> DataLoader:
        t = self.config.training
        if not train:
            return make_loader(dataset, t.batch_size, shuffle=False, seed=self.config.seed, num_workers=t.num_workers)
        loader = make_loader(dataset, t.batch_size, shuffle=True, seed=self.config.seed, rank=self.dist.rank,
                             world_size=self.dist.world_size, num_workers=t.num_workers)
        for ext in self.extensions:
            self.optimizers, loader = ext.prepare_loader(self.model, self.optimizers, loader)
        step: TrainingStep = self.model.training_step
        for ext in self.extensions:
            step = ext.wrap_training_step(self.model, step)
        self._training_step = step
        self._attach_grad_clipping()
        return loader

    def _attach_grad_clipping(self) -> None:
        """``training.grad_clip_norm``: clip each group's gradient norm right before its optimiser steps.

        Groups under DP are skipped: their per-example gradients are already clipped by Opacus.
        """
        norm = self.config.training.grad_clip_norm
        if norm is None:
            return
        for group, opt in self.optimizers.items():
            if group in self._clip_hooks or hasattr(opt, "original_optimizer"):
                continue
            params = [p for g in opt.param_groups for p in g["params"]]

            def clip(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any, params: list[Any] = params) -> None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], norm)

            self._clip_hooks[group] = opt.register_step_pre_hook(clip)

    def _set_learning_rates(self) -> None:
        t = self.config.training
        factor = lr_factor(self.state.step, self.planned_steps, warmup_steps=t.warmup_steps, schedule=t.lr_schedule,
                           min_ratio=t.min_lr_ratio)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

    # ------------------------------------------------------------------ loop

    def fit(self, train_data: ImageDataset, val_data: ImageDataset | None = None, *,
            epochs: int | None = None, max_steps: int | None = None, planned_steps: int | None = None) -> TrainingState:
        """Train until ``epochs`` completed epochs (default: config) or ``max_steps`` total steps.

        ``planned_steps`` is the length of the whole run for the learning-rate schedule (a
        federation passes rounds x local steps); by default it is derived from this call.
        """
        t = self.config.training
        target_epochs = epochs if epochs is not None else t.epochs
        max_steps = max_steps if max_steps is not None else t.max_steps
        loader = self.loader(train_data, train=True)
        by_epochs = target_epochs * max(1, len(loader))
        self.planned_steps = planned_steps or (min(max_steps, by_epochs) if max_steps is not None else by_epochs)
        val_loader = self.loader(val_data, train=False) if val_data is not None else None
        self._train_dataset = train_data
        self._check_data(train_data)
        steps = max(0, (min(max_steps, by_epochs) if max_steps is not None else by_epochs) - self.state.step)
        self._check_ledger(steps)
        self._target_epochs = target_epochs
        self._fit_started = time.perf_counter()
        # one bar for the whole stage (not one per epoch): its total and ETA are the stage's
        self._bar = progress_bar(self.planned_steps, self.stage_label, initial=min(self.state.step, self.planned_steps),
                                 enabled=self.dist.is_main and t.progress)
        try:
            stop_reason = self._fit_epochs(loader, train_data, val_loader, target_epochs, max_steps)
        finally:
            for ext in self.extensions:
                ext.after_fit()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if stop_reason:
            self.log_message(f"training stopped: {stop_reason}")
        return self.state

    def _fit_epochs(self, loader: DataLoader, train_data: ImageDataset, val_loader: DataLoader | None,
                    target_epochs: int, max_steps: int | None) -> str | None:
        """The epochs of :meth:`fit`; returns why training stopped early, if it did."""
        t = self.config.training
        stop_reason: str | None = None
        while self.state.epoch < target_epochs and stop_reason is None:
            epoch = self.state.epoch
            train_metrics, stop_reason, complete = self._train_epoch(loader, train_data, epoch, max_steps)
            self._sync_buffers()
            if complete:
                self.state.epoch = epoch + 1
                self.state.batch_in_epoch, self.state.epoch_sums = 0, {}
            metrics = {f"train_{k}": v for k, v in train_metrics.items()}
            if val_loader is not None and (not complete or self.state.epoch % t.validate_every == 0 or self.state.epoch == target_epochs):
                metrics.update({f"val_{k}": v for k, v in self.validate(val_loader).items()})
            for ext in self.extensions:
                metrics.update(ext.report())
            self.state.metrics = metrics
            self._end_of_epoch(metrics, complete=complete)
            if not complete or (max_steps is not None and self.state.step >= max_steps):
                break
        return stop_reason

    def _train_epoch(self, loader: DataLoader, dataset: ImageDataset, epoch: int,
                     max_steps: int | None) -> tuple[dict[str, float], str | None, bool]:
        """Train the rest of ``epoch``; returns (metrics so far, stop reason, whether the epoch is complete).

        The epoch goes on from ``state.batch_in_epoch``: the loader's first batches are drawn and
        dropped (the sampler is a function of seed and epoch), then a resumed checkpoint's RNG and
        augmentation states are restored, so the remaining batches and random draws are the ones
        an uninterrupted run sees.
        """
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        self.model.train()
        state = self.state
        sums = {k: v for k, v in state.epoch_sums.items() if k != "__images__"}
        images_before = int(state.epoch_sums.get("__images__", 0))
        images, stop, total = 0, None, len(loader)
        if self._pending_rng is not None and state.batch_in_epoch == 0:  # resumed at an epoch boundary
            restore_rng(self._pending_rng)
            self._pending_rng = None
        batches = iter(loader)
        for _ in range(state.batch_in_epoch):
            next(batches, None)
        if self._pending_rng is not None:  # resumed mid-epoch: the RNGs as they were after that step
            restore_rng(self._pending_rng)
            if state.data_rng is not None:
                restore_augmentation_state(dataset.aug, state.data_rng)
            self._pending_rng = None
        bar = self._bar
        start = time.perf_counter()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.training.precision == "bf16")
        every = self.config.training.checkpoint_every_steps
        while True:
            if max_steps is not None and state.step >= max_steps:
                break
            stop = next((reason for reason in (ext.stop_reason() for ext in self.extensions) if reason), None)
            if stop is not None:
                break
            batch = next(batches, None)  # drawn only once the step will be taken (a Poisson draw uses the RNG)
            if batch is None:
                break
            self._set_learning_rates()
            self.model.global_step = state.step
            out = self.train_step(batch, autocast)
            for ext in self.extensions:
                ext.after_step(self.model)
            state.step += 1
            state.batch_in_epoch += 1
            images += len(batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            state.epoch_sums = {**sums, "__images__": float(images_before + images)}
            if bar is not None:
                bar.update(1)
                rate = images * self.dist.world_size / max(time.perf_counter() - start, 1e-9)
                post = {"epoch": f"{epoch + 1}/{self._target_epochs}" if self._target_epochs < 10**6 else str(epoch + 1),
                        "loss": f"{out.get('loss', float('nan')):.4f}", "img/s": f"{rate:.1f}"}
                for ext in self.extensions:
                    post.update({k: f"{v:.3g}" for k, v in ext.report().items()})
                bar.set_postfix(post)
            if every and state.step % every == 0 and state.batch_in_epoch < total:
                rank_rng = self._gather_rank_rng()  # every rank takes part; rank 0 writes
                if self.writes:
                    self.check_finite()
                    assert self.run_dir is not None
                    self.save(self.run_dir / LAST, rank_rng=rank_rng)  # mid-epoch: resumable from this very step
        steps = state.batch_in_epoch
        complete = steps >= total
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics["images_per_s"] = images * self.dist.world_size / max(time.perf_counter() - start, 1e-9)
        metrics["steps"] = float(steps)
        return metrics, stop, complete

    def train_step(self, batch: Batch, autocast: Any = None) -> dict[str, float]:
        """One optimisation step exactly as the loop takes it (private when DP is on)."""
        batch = batch.to(self.device)
        if autocast is None:
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.training.precision == "bf16")
        with autocast:
            return self._training_step(batch, self.optimizers)

    @torch.no_grad()
    def validate(self, loader: DataLoader | ImageDataset) -> dict[str, float]:
        """Mean validation metrics over a loader (or dataset); ``loss`` is lower-is-better."""
        if isinstance(loader, ImageDataset):
            loader = self.loader(loader, train=False)
        self.model.eval()
        sums: dict[str, float] = {}
        n = 0
        with preserved_rng():  # validating must not change what training draws next
            for batch in loader:
                batch = batch.to(self.device)
                out = self.model.validation_step(batch)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
                n += len(batch)
        self.model.train()
        return {k: v / max(n, 1) for k, v in sums.items()}

    # ------------------------------------------------------------------ outputs

    def _end_of_epoch(self, metrics: dict[str, float], *, complete: bool = True) -> None:
        """Checkpoint, then log (a partial epoch's row is replaced once that epoch completes)."""
        rank_rng = self._gather_rank_rng()
        if not self.writes:
            return
        assert self.run_dir is not None
        self.check_finite()  # a diverged model is never checkpointed: last.ckpt stays the last good state
        row = {"epoch": self.state.epoch + (0 if complete else 1), "step": self.state.step, **({"round": self.state.round} if self.state.round is not None else {}), **metrics}
        val_loss = metrics.get("val_loss")
        improved = val_loss is not None and math.isfinite(val_loss) and (self.state.best_metric is None or val_loss < self.state.best_metric)
        if improved:
            self.state.best_metric = val_loss
        self.save(self.run_dir / LAST, rank_rng=rank_rng)  # checkpoint first: after a crash metrics.csv is never ahead of it
        if improved:
            self.save(self.run_dir / BEST, rank_rng=rank_rng)
        self._log_csv(row)
        self._log_tensorboard(metrics)
        if complete and self.state.epoch % self.config.training.sample_every == 0:
            self.write_sample_grid(self.run_dir / "samples" / f"epoch_{self.state.epoch:04d}.png")

    def _log_csv(self, row: dict[str, Any]) -> None:
        assert self.run_dir is not None
        path = self.run_dir / "metrics.csv"
        rows: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]  # resume overwrites the tail
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def _log_tensorboard(self, metrics: dict[str, float]) -> None:
        if not self.config.training.tensorboard:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            assert self.run_dir is not None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        for k, v in metrics.items():
            self._tb.add_scalar(k.replace("_", "/", 1), v, self.state.epoch)
        self._tb.flush()

    def finish(self) -> Path | None:
        """End of a training run (the driver calls it once, after the last :meth:`fit`): the final
        sample grid ``samples/final.png``, also for runs too short for ``training.sample_every`` to
        fire, and a line naming it with the stage's wall time. Returns the grid's path (main rank)."""
        if not self.writes:
            return None
        assert self.run_dir is not None
        path = self.run_dir / "samples" / "final.png"
        self.write_sample_grid(path)
        took = f" in {wall_time(time.perf_counter() - self._fit_started)}" if self._fit_started is not None else ""
        self.log_message(f"{self.stage_label}: step {self.state.step}, epoch {self.state.epoch}{took}; "
                         f"final samples: {path}")
        return path

    def write_sample_grid(self, path: Path) -> None:
        """Samples of the current model; a text-conditional model is prompted with its training set's
        first prompts (the grid shows what it makes of descriptions it was trained on)."""
        n = self.config.training.num_sample_images
        prompts = None
        if self.config.text is not None:
            records = getattr(getattr(self, "_train_dataset", None), "records", None) or []
            known = [r.prompt for r in records if r.prompt]
            if not known:
                return  # nothing to prompt it with (a driver without a dataset)
            prompts = [known[i % len(known)] for i in range(n)]
        with preserved_rng(), sampling_weights(self.extensions, self.model):
            images = sample(self.model, n, seed=self.config.seed, prompts=prompts, batch_size=min(n, 16))
        save_image(image_grid(images.numpy()), path)
        self.model.train()

    def log_message(self, message: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"[fedsynth] {message}")

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None,
             rank_rng: list[Any] | None = None) -> Path:
        """Checkpoint model, optimizers, state and RNG to ``path`` (atomic); ``rank_rng`` from
        :meth:`_gather_rank_rng` under DDP."""
        dataset = getattr(self, "_train_dataset", None)
        self.state.data_rng = capture_augmentation_state(dataset.aug) if dataset is not None else None
        for ext in self.extensions:
            ext.before_save()
        states = {ext.state_key: ext.state_dict() for ext in self.extensions if ext.state_key}
        return save_checkpoint(path, self.model, self.state, self.optimizers, extra=extra, rank_rng=rank_rng,
                               extension_states=states, data=self._data_fingerprint)

    @property
    def run_name(self) -> str:
        """How the site's ledger names this run: its folder."""
        return str(self.run_dir.resolve()) if self.run_dir is not None else f"in-memory run (pid {os.getpid()})"

    def _check_ledger(self, steps: int) -> None:
        """The site's lifetime budget, before any step: the privacy extension checks its plan; a run
        without one is refused or recorded as non-private."""
        if self.ledger is None or self._data_fingerprint is None or not self.dist.is_main:
            return
        privacy = self.privacy
        if privacy is not None and hasattr(privacy, "attach_ledger"):
            privacy.attach_ledger(self.ledger, self.run_name, self.driver)
        elif not getattr(self, "_non_private_recorded", False):
            check_non_private(self.ledger, self.run_name, self.driver, self._data_fingerprint)
            self._non_private_recorded = True
        for ext in self.extensions:
            ext.before_fit(self._data_fingerprint, steps)

    def _check_data(self, train_data: ImageDataset) -> None:
        """Fingerprint the training set (stored in every checkpoint); a resumed run must train on the
        images it started with, whatever their paths."""
        records = getattr(train_data, "records", None)
        if records is None or train_data is self._fingerprinted and self._resumed_data is None:
            return
        if self._resumed_data is not None:
            changed = fingerprint_changes(self._resumed_data, records)
            if changed is not None:
                raise CheckpointError(f"cannot resume: the training data differ from the data the run was trained on "
                                      f"({self._resumed_data.get('images')} image(s), sha256 "
                                      f"{str(self._resumed_data.get('sha256'))[:12]}...): {changed}. Resume with the "
                                      "original data, or start a new run folder")
            self._data_fingerprint, self._resumed_data = self._resumed_data, None  # the same data: its fingerprint
        else:
            self._data_fingerprint = fingerprint(records)
        self._fingerprinted = train_data

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if any weight is NaN or Inf (checked before every checkpoint)."""
        for group in self.model.groups():
            for name, tensor in self.model.group_module(group).state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise TrainingDiverged(
                        f"training diverged by step {self.state.step}: weight "
                        f"'{group}/{name}' is not finite; nothing was saved (lower training.learning_rate, set "
                        "training.grad_clip_norm, or resume from the last good checkpoint)")

    def _gather_rank_rng(self) -> list[Any] | None:
        """DDP: every rank's RNG and augmentation states, in rank order (a collective call: every
        rank must make it at the same point). ``None`` for a single process."""
        if self.dist.world_size == 1:
            return None
        import torch.distributed as torch_dist

        dataset = getattr(self, "_train_dataset", None)
        mine = {"rng": capture_rng(), "data_rng": capture_augmentation_state(dataset.aug) if dataset is not None else None}
        gathered: list[Any] = [None] * self.dist.world_size
        torch_dist.all_gather_object(gathered, mine)
        return gathered

    def resume(self, path: str | Path) -> TrainingState:
        """Continue exactly where ``path`` stopped: weights, optimizer states, counters, RNG."""
        payload = load_checkpoint(path)
        check_finite_weights(payload, path)
        if payload.get("family") != self.model.family:
            raise CheckpointError(f"cannot resume from {path}: it is a {payload.get('family')} checkpoint, this run trains a {self.model.family}")
        try:
            self.model.set_weights(payload["weights"], strict=True)
        except WeightsError as err:
            raise CheckpointError(f"cannot resume from {path}: {err}") from None
        changes = config_changes(payload["config"], self.config, str(path))
        for group, opt_state in payload.get("optimizers", {}).items():
            if group in self.optimizers:
                self.optimizers[group].load_state_dict(opt_state)
        self._apply_optimizer_settings()  # the loaded states carry the old learning rates
        for change in changes:
            self.log_message(f"resume: {change} (applied)")
        self.state = TrainingState(epoch=payload["epoch"], step=payload["step"], round=payload.get("round"),
                                   best_metric=payload.get("best_metric"), metrics=dict(payload.get("metrics", {})),
                                   privacy=payload.get("privacy"), batch_in_epoch=int(payload.get("batch_in_epoch", 0)),
                                   epoch_sums=dict(payload.get("epoch_sums", {})), data_rng=payload.get("data_rng"))
        self._resumed_data = payload.get("data")  # checked against the training set when fit starts
        for ext in self.extensions:
            if ext.state_key:
                ext.load_state_dict(payload.get(ext.state_key), self.model)
        if payload.get("rng") is not None and self.dist.world_size == 1:
            restore_rng(payload["rng"])  # for callers that act before fit (e.g. sampling)
            self._pending_rng = payload["rng"]  # fit restores it again where the loop stood
        elif self.dist.world_size > 1:
            ranks = payload.get("rank_rng")
            if ranks is not None and len(ranks) == self.dist.world_size:  # each rank where it stood
                mine = ranks[self.dist.rank]
                restore_rng(mine["rng"])
                self._pending_rng = mine["rng"]
                self.state.data_rng = mine["data_rng"]
            else:
                written = len(ranks) if ranks is not None else 1
                self.log_message(f"resume: {path} was written by {written} process(es), this run has "
                                 f"{self.dist.world_size}: training goes on from step {self.state.step} with fresh "
                                 "per-rank random streams (not bit-identical to an uninterrupted run)")
                torch.manual_seed(self.config.seed + 7919 * self.dist.rank + self.state.epoch)
                np.random.seed((self.config.seed + self.dist.rank + self.state.epoch) % 2**32)
        return self.state


    def _sync_buffers(self) -> None:
        """DDP: give every rank rank 0's buffers (BatchNorm running stats drift apart between
        DDP's own syncs, e.g. through forward passes of an unwrapped net), so all ranks hold one model."""
        if self.dist.world_size == 1:
            return
        import torch.distributed as torch_dist

        for net in self.model.nets.values():
            for buffer in net.buffers():
                torch_dist.broadcast(buffer.data, src=0)

    def _apply_optimizer_settings(self) -> None:
        t = self.config.training
        for group, opt in self.optimizers.items():
            for param_group in opt.param_groups:
                lr = t.group_learning_rates.get(group, t.learning_rate)
                param_group.update(lr=lr, initial_lr=lr, betas=t.betas, weight_decay=t.weight_decay)
                if "initial_lr" in param_group:  # a schedule's base rate
                    param_group["initial_lr"] = lr


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, numpy and random for this process (rank-specific)."""
    import random

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + 7919 * rank)


def build_engine(config: ExperimentConfig, run_dir: str | Path | None, dist: Distributed = Distributed(), *,
                 ledger: DatasetLedger | None = None, driver: str = "local") -> Engine:
    """Seeded model + engine (+ privacy plugin when enabled): the same for every driver
    (local training, DDP ranks, Flower and OpenFL sites); ``ledger``: the site's lifetime ledger."""
    seed_everything(config.seed, dist.rank)
    device = resolve_device(config.training.device, dist.rank)
    check_model_fits(config, device)
    model = build_model(config)
    privacy = None
    if config.privacy.enabled:
        from fedsynth.privacy.plugin import make_privacy_plugin  # optional dependency (opacus)

        privacy = make_privacy_plugin(config, model)
    return Engine(model, config, run_dir=run_dir, dist=dist, device=device, privacy=privacy, ledger=ledger, driver=driver)
