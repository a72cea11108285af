"""``fedsynth validate``: check a config against its data without training.

Reads and checks every CSV row and image with the same readers training uses
(:func:`fedsynth.data.dataset.load_datasets`), lists the images' stored shapes next to the
config's ``image_size``, builds each stage's model (latent diffusion: the first-stage autoencoder,
then the UNet on its latents) and counts its parameters per group, estimates the memory of one
training step against what the machine has free, and says what ``fedsynth train`` would run.

The memory estimate is measured, then scaled: one real training step on a two-example batch
(the configured precision and device) records every tensor autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``); that activation memory per example is scaled to
``training.batch_size`` and added to the weights, their gradients, Adam's two moments, the EMA
copy and (with DP) the per-example gradients, all from parameter counts. Activations of every
backward pass in the step are summed (a GAN step has two), so it is an upper bound there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsynth.config import ExperimentConfig, load_config, with_overrides
from fedsynth.data.dataset import ImageDataset, collate, load_datasets
from fedsynth.data.manifest import Record
from fedsynth.engine import resolve_device
from fedsynth.errors import ConfigError, FedsynthError
from fedsynth.families import first_stage
from fedsynth.models import build_model
from fedsynth.models.base import SynthesisModel
from fedsynth.processes import host_memory_available
from fedsynth.progress import first_stage_label, format_plan, network_label, plan_training

GIB = 1024**3
#: examples in the measured step (two: a one-example batch breaks batch statistics in some nets)
MEASURED_EXAMPLES = 2


@dataclass
class StageMemory:
    """One stage's model, its parameters per group and its estimated training-step memory (bytes)."""

    label: str
    groups: dict[str, tuple[int, bool]]  # group -> (parameters, trainable)
    weights: int = 0
    optimizer: int = 0  # gradients + Adam's two moments of the trainable groups
    ema: int = 0
    activations: int = 0  # for training.batch_size examples
    privacy: int = 0  # per-example gradients (DP)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.ema + self.activations + self.privacy


def available_memory(device: torch.device) -> tuple[int, str]:
    """Free memory where training runs: the GPU's free memory, else the host's ``MemAvailable``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    return host_memory_available(), "available host memory"


def stored_shapes(records: list[Record]) -> Counter[tuple[int, ...]]:
    """How many images have each stored size (array order, spatial axes only), read from file headers."""
    import SimpleITK as sitk

    shapes: Counter[tuple[int, ...]] = Counter()
    for rec in records:
        file = rec.channels[0]
        if file.is_dir():
            continue  # a DICOM series: its size is known once read (training reads it)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue  # unreadable files are refused, naming the row, by load_datasets
        shapes[tuple(int(s) for s in reversed(reader.GetSize()) if s > 1)] += 1
    return shapes


def _bytes(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def measure_stage(label: str, model: SynthesisModel, config: ExperimentConfig, data: ImageDataset,
                  device: torch.device) -> StageMemory:
    """Parameters per group and the estimated memory of one training step (see the module doc)."""
    trainable = set(model.trainable_groups())
    groups = {g: (sum(p.numel() for p in model.group_parameters(g)), g in trainable) for g in model.groups()}
    out = StageMemory(label, groups)
    out.weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    train_bytes = sum(_bytes(model.group_parameters(g)) for g in trainable)
    out.optimizer = 3 * train_bytes  # a gradient and Adam's two moments per trainable weight
    if config.training.ema_decay > 0:
        out.ema = sum(_bytes(model.group_parameters(g)) for g in model.generating_groups())
    t = config.training
    if config.privacy.enabled:
        private = config.privacy.groups or [g for g in trainable if model.group_specs()[g].sees_real_data]
        out.privacy = t.batch_size * sum(_bytes(model.group_parameters(g)) for g in private if g in trainable)
        out.notes.append("privacy: per-example gradients of the private groups are counted; Opacus is not run here")
    k = min(MEASURED_EXAMPLES, len(data))
    batch = collate([data[i] for i in range(k)]).to(device)
    model.to(device).train()
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()  # shared storage counted once
        return tensor

    optimizers = model.configure_optimizers(t)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            model.training_step(batch, optimizers)
    except torch.OutOfMemoryError:
        raise FedsynthError(f"{label}: one training step on {k} example(s) runs out of memory on {device}") from None
    except (RuntimeError, ValueError) as err:
        raise FedsynthError(f"{label}: a training step on a real batch fails: {str(err).splitlines()[0]}") from None
    out.activations = sum(saved.values()) * t.batch_size // k
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
        out.notes.append(f"measured on {device}: {peak / GIB:.2f} GiB peak for a {k}-example step")
    return out


@dataclass
class Preflight:
    """What ``fedsynth validate`` found (every check passed when it is returned)."""

    config: ExperimentConfig
    lines: list[str]
    stages: list[StageMemory]
    needed: int
    available: int


def _shape_lines(name: str, dataset: ImageDataset, records: list[Record], config: ExperimentConfig) -> list[str]:
    shapes = stored_shapes(records)
    size = list(config.image_size)
    listed = ", ".join(f"{n} x {list(s)}" for s, n in shapes.most_common(5)) or "DICOM series"
    more = f" and {len(shapes) - 5} other size(s)" if len(shapes) > 5 else ""
    how = ("resized (data.resize_mode: resize)" if config.data.resize_mode == "resize"
           else "centre-cropped or padded (data.resize_mode: crop_or_pad)")
    differ = any(list(s) != size for s in shapes)
    lines = [f"{name}: {len(records)} row(s) read and checked, {len(dataset)} image(s) kept"
             + (f", {len(dataset.skipped)} constant image(s) skipped" if dataset.skipped else ""),
             f"  stored sizes: {listed}{more}; config image_size {size}"
             + (f": images are {how} to it" if differ else ": they match")]
    for s in shapes:
        if len(s) != config.spatial_dims:
            lines.append(f"  note: size {list(s)} has {len(s)} axes; spatial_dims is {config.spatial_dims}")
    aspect = {round(s[-1] / s[-2], 2) for s in shapes if len(s) >= 2}
    if config.data.resize_mode == "resize" and len(aspect) == 1 and len(size) >= 2 and next(iter(aspect)) != round(size[-1] / size[-2], 2):
        lines.append(f"  note: resizing changes the aspect ratio (width/height {next(iter(aspect))} -> "
                     f"{round(size[-1] / size[-2], 2)}); data.resize_mode: crop_or_pad keeps it")
    return lines


def preflight(config_path: str, data: str, val_data: str | None = None,
              overrides: Mapping[str, Any] | None = None) -> Preflight:
    """Every check of ``fedsynth validate``; raises a :class:`FedsynthError` naming the first problem."""
    config = with_overrides(load_config(config_path), overrides or {})
    lines = [f"config {config_path}: valid ({config.family}, {config.spatial_dims}D, image_size {list(config.image_size)}, "
             f"{config.channels} channel(s), conditioning {config.conditioning})"]
    train, val = load_datasets(config, data, val_data)
    lines += _shape_lines(f"training data {data}", train, list(train.records) + list(train.skipped), config)
    if val is not None:
        source = val_data if val_data is not None else f"{data} (data.val_fraction {config.data.val_fraction})"
        lines += _shape_lines(f"validation data {source}", val, list(val.records) + list(val.skipped), config)
    else:
        lines.append("validation data: none (best.ckpt is not written; pass --val-data or set data.val_fraction)")
    device = resolve_device(config.training.device)
    stages: list[StageMemory] = []
    stage = first_stage(config)
    first_model = None
    if stage is not None and stage.to_train:
        stage_config = stage.experiment()
        first_model = build_model(stage_config)
        stages.append(measure_stage(first_stage_label(stage_config.family), first_model, stage_config, train, device))
    model = build_model(config, first_model) if first_model is not None else build_model(config)
    stages.append(measure_stage(network_label(config.family), model, config, train, device))
    for s in stages:
        lines.append(f"model, {s.label}: " + ", ".join(
            f"{g} {n:,}{'' if trainable else ' (frozen)'}" for g, (n, trainable) in s.groups.items()) + " parameters")
    needed = max(s.total for s in stages)  # stages run one after the other
    free, where = available_memory(device)
    batch = config.training.batch_size
    for s in stages:
        lines.append(f"memory of one training step, {s.label} (batch {batch}, {config.training.precision}, {device.type}): "
                     f"about {s.total / GIB:.2f} GiB = weights {s.weights / GIB:.2f} + gradients/Adam {s.optimizer / GIB:.2f}"
                     + (f" + EMA {s.ema / GIB:.2f}" if s.ema else "")
                     + f" + activations {s.activations / GIB:.2f}" + (f" + per-example gradients {s.privacy / GIB:.2f}" if s.privacy else "")
                     + f" (activations measured on a {MEASURED_EXAMPLES}-example step, scaled to {batch})")
        lines += [f"  {note}" for note in s.notes]
    lines.append(f"memory: {needed / GIB:.2f} GiB needed per process, {free / GIB:.2f} GiB {where}")
    if needed > free:
        raise ConfigError(f"one training step needs about {needed / GIB:.2f} GiB, but only {free / GIB:.2f} GiB is {where}: "
                          f"lower training.batch_size ({batch}), training.precision: bf16, or the model's widths")
    lines.append("fedsynth train would run:")
    lines += [f"  {ln}" for ln in format_plan(plan_training(config, len(train))).splitlines()]
    return Preflight(config, lines, stages, needed, free)
