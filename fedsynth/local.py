"""Local driver: train one site's model in this process, or in N DDP processes (``--devices N``).

Also works under ``torchrun`` (it reads ``RANK``/``WORLD_SIZE`` from the environment).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from fedsynth.checkpoint import config_changes, load_checkpoint
from fedsynth.config import ExperimentConfig, load_config, save_config, with_overrides
from fedsynth.data.dataset import ImageDataset, load_datasets
from fedsynth.data.manifest import fingerprint_changes
from fedsynth.engine import BEST, LAST, Distributed, Engine, build_engine, resolve_device
from fedsynth.errors import CheckpointError, ConfigError, OutputError
from fedsynth.families import first_stage
from fedsynth.io import FolderLock
from fedsynth.privacy.lifetime import DatasetLedger, default_ledger_dir
from fedsynth.processes import free_port
from fedsynth.progress import announce, first_stage_label, format_plan, plan_training


@dataclass(frozen=True)
class TrainRequest:
    """Everything ``fedsynth train`` was asked to do."""

    config_path: str
    data: str
    run_dir: str
    val_data: str | None = None
    epochs: int | None = None
    resume: bool = False
    devices: int = 1
    overwrite: bool = False  # start again in a run folder that already holds a run
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted config fields from the command line
    ledger: str | None = None  # the site's lifetime privacy ledger (default: $FEDSYNTH_LEDGER)


#: what a run folder holds once a run has written to it (``first_stage``: latent diffusion's first stage is part of the run)
RUN_FILES = (LAST, BEST, "metrics.csv", "config.yaml")
RUN_FOLDERS = ("samples", "tensorboard", "first_stage")
#: where ``--overwrite`` keeps the run it replaces until the new run has trained
REPLACED = ".replaced"


def prepare_run_dir(request: TrainRequest) -> None:
    """Refuse to train into a folder holding a run unless asked to resume it or to overwrite it.

    Only checks: nothing is moved or deleted here (see :class:`ReplacedRun`)."""
    run_dir = Path(request.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"-o {run_dir}: is a file; the run folder must be a folder")
    if (run_dir / REPLACED).exists():
        raise OutputError(f"-o {run_dir}: holds {REPLACED}/, a run an earlier --overwrite set aside and did not finish "
                          f"replacing; move what you want to keep out of {run_dir / REPLACED} (or delete it), then "
                          "run again")
    found = _run_entries(run_dir)
    if request.resume:
        if not (run_dir / LAST).is_file():
            raise CheckpointError(f"--resume: no checkpoint to resume from at {run_dir / LAST}")
        return
    if found and not request.overwrite:
        raise OutputError(f"-o {run_dir}: the folder already holds a run ({', '.join(found)}); pass --resume to "
                          f"continue it or --overwrite to start again")


def _run_entries(run_dir: Path) -> list[str]:
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists()]


class ReplacedRun:
    """``--overwrite`` without losing the old run on a failed start: once every input has been checked,
    the old run's files move into ``RUN/.replaced/`` (renames, same disk); if the new run fails
    before it has written a checkpoint they move back, and once it has trained they are deleted."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.aside = run_dir / REPLACED
        self.moved: list[str] = []

    def set_aside(self) -> None:
        entries = _run_entries(self.run_dir)
        if not entries:
            return
        self.aside.mkdir()
        for name in entries:
            (self.run_dir / name).rename(self.aside / name)
            self.moved.append(name)

    def restore(self) -> None:
        """Put the folder back as it was: the failed new run's files are removed (without a checkpoint
        they are not a run), then the old run, if one was set aside, moves back."""
        for name in _run_entries(self.run_dir):
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        for name in self.moved:
            (self.aside / name).rename(self.run_dir / name)
        if self.moved:
            self.aside.rmdir()
        self.moved = []

    def discard(self) -> None:
        if self.moved:
            shutil.rmtree(self.aside)
            self.moved = []


def check_resume(request: TrainRequest, config: ExperimentConfig, train_data: ImageDataset) -> None:
    """Every reason a resume would be refused, found before anything trains (a first stage included)."""
    run_dir = Path(request.run_dir)
    payload = load_checkpoint(run_dir / LAST)
    if payload.get("family") != config.family:
        raise CheckpointError(f"cannot resume from {run_dir / LAST}: it is a {payload.get('family')} checkpoint, "
                              f"this config trains a {config.family}")
    stage = first_stage(config)
    expected = config
    if stage is not None and stage.to_train:
        expected = stage.trained_at(str((run_dir / "first_stage" / LAST).resolve()))
    config_changes(payload["config"], expected, str(run_dir / LAST))
    if payload.get("data"):
        changed = fingerprint_changes(payload["data"], train_data.records)
        if changed is not None:
            raise CheckpointError(f"cannot resume from {run_dir / LAST}: the training data differ from the data the run "
                                  f"was trained on: {changed}. Resume with the original data, or start a new run folder")


def run_training(request: TrainRequest, dist: Distributed = Distributed()) -> Engine:
    """Train as requested in this process (one rank of a DDP job when ``dist.world_size > 1``).

    Everything that can be checked is checked before the first write: the config, every image,
    a resume's compatibility; ``--overwrite`` sets the old run aside only then (:class:`ReplacedRun`)."""
    config = with_overrides(load_config(request.config_path), request.overrides)
    if request.epochs is not None:
        if request.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {request.epochs}")
        config.training.epochs = request.epochs
    run_dir = Path(request.run_dir)
    if dist.is_main:
        prepare_run_dir(request)
    train_data, val_data = load_datasets(config, request.data, request.val_data)
    stage = first_stage(config)
    if stage is not None:
        stage.check_local_training()
    if request.resume:
        check_resume(request, config, train_data)
    if dist.is_main:
        announce(format_plan(plan_training(config, len(train_data), dist.world_size)))
    replaced = ReplacedRun(run_dir)
    if dist.is_main and request.overwrite:
        replaced.set_aside()
    if config.privacy.enabled:
        config.privacy.check_dataset_size(len(train_data))
    try:
        engine = _train(request, config, run_dir, train_data, val_data, dist)
    except BaseException:
        if dist.is_main and not request.resume and not (run_dir / LAST).is_file():
            replaced.restore()  # the new run wrote no checkpoint: the folder is put back as it was
        elif replaced.moved:
            print(f"fedsynth train: the run this --overwrite replaced is kept in {replaced.aside}", file=sys.stderr)
        raise
    replaced.discard()
    return engine


def _train(request: TrainRequest, config: ExperimentConfig, run_dir: Path, train_data: ImageDataset,
           val_data: ImageDataset | None, dist: Distributed) -> Engine:
    stage = first_stage(config)
    ledger = open_ledger(request.ledger)
    if stage is not None and stage.to_train:
        config = train_first_stage(config, run_dir, train_data, val_data, dist, ledger=ledger)
    engine = build_engine(config, run_dir, dist, ledger=ledger)
    if request.resume:
        last = run_dir / LAST
        engine.resume(last)
        engine.log_message(f"resumed from {last} at epoch {engine.state.epoch}, step {engine.state.step}")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    engine.fit(train_data, val_data)
    engine.finish()  # the final sample grid, named
    return engine


def open_ledger(folder: str | Path | None) -> DatasetLedger | None:
    """The site's lifetime privacy ledger: ``folder``, else ``$FEDSYNTH_LEDGER``, else none."""
    chosen = Path(folder) if folder else default_ledger_dir()
    return DatasetLedger(chosen) if chosen is not None else None


def train_first_stage(config: ExperimentConfig, run_dir: Path, train_data: ImageDataset, val_data: ImageDataset | None,
                      dist: Distributed = Distributed(), *, ledger: DatasetLedger | None = None) -> ExperimentConfig:
    """A model on a first stage from one config (latent diffusion: the autoencoder, then the UNet):
    train (or resume) the first stage in ``run_dir/first_stage``, then return the config pointing
    at its checkpoint."""
    stage = first_stage(config)
    assert stage is not None and stage.to_train, "train_first_stage: the config has no first stage to train"
    stage_dir = run_dir / "first_stage"
    stage_config = stage.experiment()
    engine = build_engine(stage_config, stage_dir, dist, ledger=ledger)
    engine.stage_label = first_stage_label(stage_config.family)
    if (stage_dir / LAST).is_file():
        engine.resume(stage_dir / LAST)
    if engine.state.step < (stage_config.training.max_steps or 0):
        engine.log_message(f"{stage.kind}: training the first stage ({stage_config.family}) for "
                           f"{stage_config.training.max_steps} steps in {stage_dir}")
        engine.fit(train_data, val_data)
        if dist.is_main:
            engine.save(stage_dir / LAST)
    if dist.world_size > 1:
        torch_dist.barrier()
    return stage.trained_at(str((stage_dir / LAST).resolve()))


def _worker(rank: int, request: TrainRequest, world_size: int, port: int) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    _train_rank(request, Distributed(rank, world_size))


def _train_rank(request: TrainRequest, dist: Distributed) -> None:
    """One DDP rank, in a started process group: train, wait for every rank, then leave the group.

    The DDP-wrapped nets' reducers hold the process group (and gloo's threads): they are freed
    before the group is destroyed, not at interpreter exit, where gloo can abort the process.
    """
    try:
        engine = run_training(request, dist)
        torch_dist.barrier()
        del engine
    finally:
        gc.collect()
        torch_dist.destroy_process_group()


def train(request: TrainRequest) -> None:
    """Entry point of ``fedsynth train``: spawn DDP workers when asked, else train in-process.

    The run folder is locked for the whole run (:class:`~fedsynth.io.FolderLock`): a second
    ``train`` into it is refused, naming the process that holds it."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:  # started by torchrun: rank 0 holds the folder
        rank = int(os.environ["RANK"])
        backend = "nccl" if resolve_device("auto").type == "cuda" else "gloo"
        with FolderLock(request.run_dir, "fedsynth train") if rank == 0 else contextlib.nullcontext():
            torch_dist.init_process_group(backend)
            _train_rank(request, Distributed(rank, env_world))
        return
    if request.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {request.devices}")
    prepare_run_dir(request)  # before the lock creates the folder: a file there is named as such
    with FolderLock(request.run_dir, "fedsynth train"):
        if request.devices > 1:
            with_overrides(load_config(request.config_path), request.overrides)  # fail fast, in the parent, on a bad config
            torch.multiprocessing.start_processes(_worker, args=(request, request.devices, free_port()),
                                                  nprocs=request.devices, start_method="spawn")
            return
        run_training(request)
