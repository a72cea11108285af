"""The contract every synthesis model fulfils: named parameter groups and family hooks.

A :class:`SynthesisModel` owns one or more MONAI networks (``self.nets``) and declares how
their parameters split into *groups* (``generator``, ``discriminator``, ``encoder``, ...).
Weights travel between processes, frameworks and files only as a flat mapping
``"<group>/<parameter or buffer name>" -> np.ndarray`` produced by :meth:`get_weights` and
consumed by :meth:`set_weights`. The engine owns the loop; a family fills in three hooks:
:meth:`training_step`, :meth:`validation_step` and :meth:`generate`. What differential privacy
needs of a family is declared, not hooked: each group's :class:`GroupSpec` says whether it sees
real images and carries a :class:`PrivacySpec`, which :mod:`fedsynth.privacy` acts on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from fedsynth.errors import WeightsError

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig, TrainingConfig

GROUP_SEP = "/"


ConfigValue = bool | int | float | str


@dataclass(frozen=True)
class ConfigSwitch:
    """A model-config setting that per-example DP forbids in a private group's network.

    When ``model.<setting>`` is not one of ``allowed``, DP sets it to ``value`` (so the stored
    config, and every network rebuilt from a checkpoint, says so) and rebuilds the group's
    network with :meth:`SynthesisModel.build_net`. ``change`` says what that does to the network,
    ``reason`` why DP forbids the setting (both end up in the run's privacy messages).
    """

    setting: str
    allowed: tuple[ConfigValue, ...]
    value: ConfigValue
    change: str
    reason: str


@dataclass
class Feature:
    """A training feature the model reads at every step (e.g. a regulariser) and DP switches off
    while the group declaring it is private. The config is left as it is: the feature is off for
    this run only, and a federation's config (hashed into each site's state folder) is unchanged."""

    name: str
    reason: str
    on: bool = True


class Freeze(Protocol):
    """Family code that freezes a statistic the model would otherwise compute from raw images
    outside DP (run once, before the group's optimizer exists); returns what it froze, in words."""

    def __call__(self) -> list[str]: ...


class DrawnStep(Protocol):
    """One step of a group that never sees real images, alone, on the sample the model draws."""

    def __call__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]: ...


@dataclass
class DrawnSample:
    """The sample a group that never sees real images steps on, drawn by the model itself (a GAN's
    generator steps on fakes).

    ``size`` ``None``: as many draws as the real batch, with its labels. An int: that many draws with
    random labels, whatever the real batch. Under DP, where the group is not private, the privacy
    plugin sets it to the expected Poisson batch, so the group's step depends on the private groups
    only, and takes ``step`` on an empty Poisson batch too, so the batch's emptiness shows nowhere.
    """

    step: DrawnStep
    size: int | None = None


@dataclass(frozen=True)
class PrivacySpec:
    """What example-level DP needs of one parameter group, declared by its family and acted on by
    :mod:`fedsynth.privacy` (which knows no family). The default needs nothing beyond the wrapping.

    While the group is private:

    - ``rows_per_example``: rows its network sees per real example in one training forward (a
      discriminator scores ``[real; fake]``: 2); they are folded into one per-example gradient
      before clipping, so one image changes one clipped vector.
    - ``switches``: config settings of its network that DP forbids (they mix examples).
    - ``features``: training features DP switches off for the run.
    - ``freezes``: statistics of raw data, computed outside DP, that must stay fixed.

    While the group trains but is not private: ``drawn``, the sample it steps on instead of the data.
    """

    rows_per_example: int = 1
    switches: tuple[ConfigSwitch, ...] = ()
    features: tuple[Feature, ...] = ()
    freezes: tuple[Freeze, ...] = ()
    drawn: DrawnSample | None = None


@dataclass(frozen=True)
class GroupSpec:
    """Which part of which network forms a parameter group, and what DP needs of it.

    ``modules`` lists child-module names inside ``self.nets[net]``; empty means the whole net.
    A group that is not ``trainable`` gets no optimizer (e.g. a frozen autoencoder).
    ``sees_real_data`` marks groups whose gradients are computed from real images: the ones
    example-level DP wraps by default. ``privacy`` declares the rest (:class:`PrivacySpec`).
    """

    net: str
    modules: tuple[str, ...] = ()
    trainable: bool = True
    sees_real_data: bool = True
    privacy: PrivacySpec = field(default_factory=PrivacySpec)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and Opacus (``._module``) wrappers so keys never gain prefixes."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_module") and isinstance(module._module, nn.Module):
            module = module._module  # Opacus GradSampleModule
        else:
            return module


@dataclass
class Batch:
    """One mini-batch: images in the model's data range and its condition record, i.e. optional
    integer class labels (the CSV's ``Label``) and optional prompts (its ``Prompt``)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None

    def to(self, device: torch.device) -> Batch:
        labels = self.labels.to(device) if self.labels is not None else None
        return Batch(self.images.to(device), labels, self.prompts)

    def __len__(self) -> int:
        return int(self.images.shape[0])


class SynthesisModel(nn.Module):
    """Base class of the autoencoder, GAN and diffusion families."""

    family: ClassVar[str]
    #: per-group policy used when the federation config names no policy for a group
    default_federation_policy: ClassVar[dict[str, str]] = {}
    #: the groups that make the images (EMA-averaged for sampling): generator, unet, codec
    generating: ClassVar[tuple[str, ...]] = ()
    weights_loaded: str = "raw"  # which weights a checkpoint put in: "raw" or "ema" (see load_for_inference)

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_dims: int = config.spatial_dims
        self.in_channels: int = config.channels
        self.image_size: tuple[int, ...] = tuple(config.image_size)
        self.num_classes: int = config.num_classes
        self.nets = nn.ModuleDict()
        #: optimiser steps taken so far, set by the engine before each step (for warm-ups)
        self.global_step: int = 0

    # ------------------------------------------------------------------ groups

    def group_specs(self) -> dict[str, GroupSpec]:
        """Ordered mapping of group name to its :class:`GroupSpec` (families override)."""
        raise NotImplementedError

    def groups(self) -> list[str]:
        """Names of all parameter groups, in a stable order."""
        return list(self.group_specs())

    def generating_groups(self) -> list[str]:
        """Trainable groups that produce samples (the ones an EMA averages)."""
        return [g for g in self.generating if g in self.trainable_groups()]

    def trainable_groups(self) -> list[str]:
        return [g for g, s in self.group_specs().items() if s.trainable]

    def trainable_net_names(self) -> list[str]:
        """Networks holding at least one trainable group (the ones DDP/DP wrap)."""
        names: list[str] = []
        for spec in self.group_specs().values():
            if spec.trainable and spec.net not in names:
                names.append(spec.net)
        return names

    def net(self, name: str) -> nn.Module:
        """The network ``name`` as stored (possibly wrapped by DDP or Opacus)."""
        return self.nets[name]

    def plain_net(self, name: str) -> nn.Module:
        """The network ``name`` with every wrapper removed (use for sampling and export)."""
        return unwrap(self.nets[name])

    def group_module(self, group: str) -> nn.Module:
        """A module whose ``state_dict`` is exactly the group's parameters and buffers."""
        spec = self._spec(group)
        net = self.plain_net(spec.net)
        if not spec.modules:
            return net
        return nn.ModuleDict({name: getattr(net, name) for name in spec.modules})

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        return list(self.group_module(group).parameters())

    def _spec(self, group: str) -> GroupSpec:
        specs = self.group_specs()
        if group not in specs:
            raise WeightsError(f"unknown parameter group '{group}'; this {self.family} model has {list(specs)}")
        return specs[group]

    # ------------------------------------------------------------------ weights

    def get_weights(self, groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Copy the weights of ``groups`` (default all) as ``{"group/name": array}``, buffers included."""
        names = list(groups) if groups is not None else self.groups()
        out: dict[str, np.ndarray] = {}
        for group in names:
            for key, tensor in self.group_module(group).state_dict().items():
                out[f"{group}{GROUP_SEP}{key}"] = tensor.detach().cpu().numpy().copy()
        return out

    def set_weights(self, weights: Mapping[str, np.ndarray | torch.Tensor], strict: bool = True) -> None:
        """Load group-keyed weights. Unknown keys and wrong shapes always raise, naming the key.

        With ``strict`` every key of each group that appears in ``weights`` must be present;
        groups absent from ``weights`` are left unchanged (so a subset of groups can be loaded).
        """
        by_group: dict[str, dict[str, torch.Tensor]] = {}
        specs = self.group_specs()
        for key, value in weights.items():
            group, sep, name = key.partition(GROUP_SEP)
            if not sep or group not in specs:
                raise WeightsError(f"unknown weight key '{key}': expected '<group>/<name>' with group in {list(specs)}")
            by_group.setdefault(group, {})[name] = torch.as_tensor(np.asarray(value))
        for group, incoming in by_group.items():
            module = self.group_module(group)
            current = module.state_dict()
            unknown = sorted(set(incoming) - set(current))
            if unknown:
                raise WeightsError(f"unknown weight key '{group}/{unknown[0]}' ({len(unknown)} unknown in group '{group}')")
            missing = sorted(set(current) - set(incoming))
            if strict and missing:
                raise WeightsError(f"missing weight key '{group}/{missing[0]}' ({len(missing)} missing in group '{group}')")
            for name, tensor in incoming.items():
                if tuple(tensor.shape) != tuple(current[name].shape):
                    raise WeightsError(
                        f"wrong shape for '{group}/{name}': expected {tuple(current[name].shape)}, "
                        f"got {tuple(tensor.shape)}"
                    )
                incoming[name] = tensor.to(dtype=current[name].dtype)
            module.load_state_dict(incoming, strict=False)

    # ------------------------------------------------------------------ first stage (fedsynth.families.FirstStage)

    def first_stage(self) -> SynthesisModel | None:
        """The trained model this one is built on and keeps frozen in its first stage's groups
        (latent diffusion: the autoencoder), or ``None``. Checkpoints store its config so they
        rebuild without it; a federation ships its architecture. Default: none."""
        return None

    def first_stage_sha256(self, weights: Mapping[str, np.ndarray] | None = None) -> str | None:
        """The identity of the first stage held in ``weights`` (default: this model's own), what a
        federation pins; ``None`` for a model without a first stage."""
        return None

    def check_received(self, weights: Mapping[str, np.ndarray], source: str) -> None:
        """Raise :class:`WeightsError` when weights a site received from ``source`` break what its
        config pins (a shipped first stage's hash). Default: nothing is pinned."""

    def averaged_frozen_keys(self) -> frozenset[str]:
        """Weight keys of frozen groups that each site still sets from its own data and the server
        averages (the latent scale); every other frozen weight is nobody's to change. Default: none."""
        return frozenset()

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self, training: TrainingConfig) -> dict[str, torch.optim.Optimizer]:
        """One Adam optimizer per trainable group, so optimizer state is per group too."""
        optimizers: dict[str, torch.optim.Optimizer] = {}
        for group in self.trainable_groups():
            lr = training.group_learning_rates.get(group, training.learning_rate)
            optimizers[group] = torch.optim.Adam(
                self.group_parameters(group), lr=lr, betas=training.betas, weight_decay=training.weight_decay
            )
        return optimizers

    # ------------------------------------------------------------------ networks

    def build_net(self, name: str) -> nn.Module:
        """Network ``name`` built afresh from the current config: what a :class:`ConfigSwitch`
        needs after changing a setting (families that declare switches implement it)."""
        raise NotImplementedError(f"the {self.family} family cannot rebuild network '{name}' from its config")

    # ------------------------------------------------------------------ family hooks

    def training_step(self, batch: Batch, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        """One optimisation step on ``batch`` (zero_grad, backward, step); returns scalar losses."""
        raise NotImplementedError

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, float]:
        """Scalar validation metrics for ``batch``; must contain ``"loss"`` (lower is better)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        num_images: int,
        *,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        prompts: list[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Sample ``num_images`` images, shape ``(N, C, *image_size)``, in the data range ([0, 1])."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_labels(self, labels: torch.Tensor | None, num_images: int) -> torch.Tensor | None:
        """Validate class labels for conditional generation (``None`` for unconditional models)."""
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("this model is unconditional (num_classes = 0): do not pass a label")
            return None
        if labels is None:
            return torch.arange(num_images, device=self.device) % self.num_classes
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(num_images)
        if labels.numel() != num_images or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be {num_images} integers in [0, {self.num_classes - 1}]")
        return labels

    def check_prompts(self, prompts: list[str] | None, num_images: int) -> list[str] | None:
        """Validate prompts for text-conditional generation: one per image, or one for all."""
        if self.config.text is None:
            if prompts is not None:
                raise ValueError("this model is not text-conditional (no text block in its config): do not pass a prompt")
            return None
        if not prompts:
            raise ValueError("this model is text-conditional: give a prompt (generate --prompt TEXT or --prompts-file)")
        if len(prompts) == 1:
            return list(prompts) * num_images
        if len(prompts) != num_images:
            raise ValueError(f"{len(prompts)} prompts for {num_images} images: give one prompt, or one per image")
        return list(prompts)


class FrozenParameters:
    """Temporarily switch off ``requires_grad`` on a module's parameters (inputs still get gradients)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.module.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        hooks = getattr(self.module, "disable_hooks", None)  # Opacus GradSampleModule
        if callable(hooks):
            hooks()

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)
        hooks = getattr(self.module, "enable_hooks", None)
        if callable(hooks):
            hooks()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map data-range images ([0, 1]) to the networks' range ([-1, 1])."""
    return images * 2.0 - 1.0


def to_data_range(images: torch.Tensor) -> torch.Tensor:
    """Map network outputs ([-1, 1]) back to the data range ([0, 1])."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
