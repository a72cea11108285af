"""Local driver: train one site's model in this process, or in N DDP processes (``--devices N``).

Also works under ``torchrun`` (it reads ``RANK``/``WORLD_SIZE`` from the environment).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from fedsynth.config import ExperimentConfig, load_config, save_config
from fedsynth.data.dataset import ImageDataset, load_datasets
from fedsynth.engine import BEST, LAST, Distributed, Engine, build_engine, resolve_device
from fedsynth.errors import CheckpointError, ConfigError, OutputError
from fedsynth.families import first_stage
from fedsynth.processes import free_port


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


#: what a run folder holds once a run has written to it
RUN_FILES = (LAST, BEST, "metrics.csv", "config.yaml")
RUN_FOLDERS = ("samples", "tensorboard")


def prepare_run_dir(request: TrainRequest) -> None:
    """Refuse to train into a folder holding a run unless asked to resume it or to overwrite it."""
    run_dir = Path(request.run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if request.resume:
        if not (run_dir / LAST).is_file():
            raise CheckpointError(f"--resume: no checkpoint to resume from at {run_dir / LAST}")
        return
    if not found:
        return
    if not request.overwrite:
        raise OutputError(f"-o {run_dir}: the folder already holds a run ({', '.join(found)}); pass --resume to "
                            f"continue it or --overwrite to start again")
    import shutil

    for name in found:
        (run_dir / name).unlink()
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def run_training(request: TrainRequest, dist: Distributed = Distributed()) -> Engine:
    """Train as requested in this process (one rank of a DDP job when ``dist.world_size > 1``)."""
    config = load_config(request.config_path)
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
        if stage.to_train:
            config = train_first_stage(config, run_dir, train_data, val_data, dist)
    engine = build_engine(config, run_dir, dist)
    if request.resume:
        last = run_dir / LAST
        if not last.is_file():
            raise CheckpointError(f"--resume: no checkpoint to resume from at {last}")
        engine.resume(last)
        engine.log_message(f"resumed from {last} at epoch {engine.state.epoch}, step {engine.state.step}")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    engine.fit(train_data, val_data)
    return engine


def train_first_stage(config: ExperimentConfig, run_dir: Path, train_data: ImageDataset, val_data: ImageDataset | None,
                      dist: Distributed = Distributed()) -> ExperimentConfig:
    """A model on a first stage from one config (latent diffusion: the autoencoder, then the UNet):
    train (or resume) the first stage in ``run_dir/first_stage``, then return the config pointing
    at its checkpoint."""
    stage = first_stage(config)
    assert stage is not None and stage.to_train, "train_first_stage: the config has no first stage to train"
    stage_dir = run_dir / "first_stage"
    stage_config = stage.experiment()
    engine = build_engine(stage_config, stage_dir, dist)
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
    """Entry point of ``fedsynth train``: spawn DDP workers when asked, else train in-process."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:  # started by torchrun
        rank = int(os.environ["RANK"])
        backend = "nccl" if resolve_device("auto").type == "cuda" else "gloo"
        torch_dist.init_process_group(backend)
        _train_rank(request, Distributed(rank, env_world))
        return
    if request.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {request.devices}")
    if request.devices > 1:
        load_config(request.config_path)  # fail fast, in the parent, on a bad config
        prepare_run_dir(request)
        torch.multiprocessing.start_processes(_worker, args=(request, request.devices, free_port()),
                                              nprocs=request.devices, start_method="spawn")
        return
    run_training(request)
