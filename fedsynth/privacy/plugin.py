"""Example-level differential privacy (DP-SGD with Opacus) as an engine extension (:mod:`fedsynth.extensions`).

The plugin knows no family: it acts on what each model declares on its parameter groups
(:class:`~fedsynth.models.base.GroupSpec`, :class:`~fedsynth.models.base.PrivacySpec`).
What happens, and why:

- **Which groups.** By default every trainable group whose gradients are computed from real
  images (``GroupSpec.sees_real_data``); a group that only sees what private groups output
  inherits the guarantee by post-processing. Leaving a data-facing group out is an error.
- **Before the optimizers exist** (:func:`make_privacy_plugin`, called by ``build_engine``):
  each private group's declared needs are applied: config settings that mix examples are
  switched and the network rebuilt (``switches``), training features are switched off for the
  run (``features``), statistics of raw data computed outside DP are frozen (``freezes``). Then
  layers Opacus cannot handle are replaced (BatchNorm → GroupNorm, with a message) and every
  layer's input is made contiguous (Opacus' hook mode gives silently wrong per-sample gradients
  for channels-last conv inputs, which MONAI's attention blocks produce).
- **make_private** (once per dataset): each private network becomes a ``GradSampleModule``
  (``_module.`` never reaches group keys: models export through ``unwrap``), each private group's
  optimizer a ``DPOptimizer``, and the loader a Poisson-sampling loader whose empty batches
  are handled by a noise-only step that is still accounted. A trainable group outside DP that
  steps on a sample the model draws (``PrivacySpec.drawn``) gets a fixed sample size, the
  expected batch, and takes its step on empty batches too: its step then shows nothing of the
  real batch (its size, labels or emptiness) beyond what the private groups release.
- **One mechanism per batch.** A batch may update k private groups (e.g. an encoder, a decoder
  and a critic), each clipping and noising on its own. Each group clips to
  ``max_grad_norm / sqrt(k)`` with noise multiplier ``noise_multiplier * sqrt(k)``: the
  concatenated per-example gradient then has norm ≤ ``max_grad_norm`` and per-coordinate noise
  ``noise_multiplier * max_grad_norm``, i.e. exactly one subsampled Gaussian mechanism with
  ``noise_multiplier``, which the ledger records once.
- **Rows per example.** A network may see several rows per real example in one forward (a critic
  scoring ``[real; synthetic]``: ``PrivacySpec.rows_per_example`` = 2, 2n rows for n examples).
  Row i, n+i, ... are folded into example i's gradient before clipping, so adding or removing one
  image changes one clipped vector (sensitivity ``max_grad_norm``), never several.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fedsynth.config import ExperimentConfig
from fedsynth.data.dataset import collate
from fedsynth.errors import ConfigError
from fedsynth.extensions import Extension, TrainingStep
from fedsynth.models.base import GROUP_SEP, Batch, ConfigSwitch, ConfigValue, DrawnSample, SynthesisModel
from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.privacy.lifetime import DatasetLedger, LifetimeGuard

log = logging.getLogger("fedsynth.privacy")

# Opacus' per-sample hooks fire on a network's first layer, whose input needs no gradient: benign.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


def private_groups(model: SynthesisModel, config: ExperimentConfig) -> list[str]:
    """The groups DP wraps: ``privacy.groups`` validated, else the data-facing trainable groups."""
    specs = model.group_specs()
    data_facing = [g for g, s in specs.items() if s.trainable and s.sees_real_data]
    if config.privacy.groups is None:
        groups = data_facing
    else:
        for g in config.privacy.groups:
            if g not in specs:
                raise ConfigError(f"privacy.groups: unknown group '{g}' for a {model.family} model; its groups are {list(specs)}")
            if not specs[g].trainable:
                raise ConfigError(f"privacy.groups: group '{g}' is frozen (not trained), so it needs no DP")
        groups = [g for g in specs if g in config.privacy.groups]
    left_out = [g for g in data_facing if g not in groups]
    if left_out:
        raise ConfigError(
            f"privacy.groups leaves out '{left_out[0]}', whose gradients are computed from real images: "
            f"the (epsilon, delta) guarantee would not hold; add it (data-facing groups: {data_facing})"
        )
    if not groups:
        raise ConfigError(f"privacy: this {model.family} model has no trainable group that sees real images")
    return groups


def make_privacy_plugin(config: ExperimentConfig, model: SynthesisModel) -> OpacusPrivacy:
    """Prepare ``model`` for DP (before its optimizers are built) and return the engine's plugin."""
    return OpacusPrivacy(config, model)


class PairedDPOptimizer(DPOptimizer):
    """A ``DPOptimizer`` that folds the rows its group sees per example (``PrivacySpec.rows_per_example``)
    into one per-example gradient before clipping."""

    examples: int | None = None  # real examples in the current batch (set per step by the plugin)
    rows_per_example: int = 1  # what the group declares
    group: str = "?"

    def clip_and_accumulate(self) -> None:
        n, k = self.examples, self.rows_per_example
        if n is not None:
            for p in self.params:
                gs = getattr(p, "grad_sample", None)
                if isinstance(gs, torch.Tensor) and gs.shape[0] != n:
                    if gs.shape[0] != k * n:
                        raise RuntimeError(
                            f"group '{self.group}': per-sample gradients have {gs.shape[0]} rows for a batch of {n} "
                            f"examples; the group declares {k} row(s) per example (PrivacySpec.rows_per_example), "
                            "each a whole copy of the batch"
                        )
                    p.grad_sample = gs.reshape(k, n, *gs.shape[1:]).sum(0) / k
        super().clip_and_accumulate()

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        """Clip, noise and scale in float32 even inside the engine's bf16 autocast."""
        device = self.params[0].device.type if self.params else "cpu"
        with torch.autocast(device, enabled=False):
            return super().pre_step(closure)


class OpacusPrivacy(Extension):
    """The engine's privacy extension: Opacus on the private groups, one ledger for the site's data.

    Hooks: ``prepare_loader`` makes the model private (once per dataset), ``wrap_training_step``
    accounts one mechanism per batch, ``stop_reason`` stops before the budget is exceeded,
    ``report`` gives epsilon, the ledger is the checkpoint state under ``privacy``.
    """

    state_key = "privacy"

    def __init__(self, config: ExperimentConfig, model: SynthesisModel) -> None:
        self.config = config
        self.cfg = config.privacy
        self.groups = private_groups(model, config)
        specs = model.group_specs()
        self.net_names = list(dict.fromkeys(specs[g].net for g in self.groups))
        mode = self.cfg.grad_sample_mode
        self.grad_sample_mode = ("functorch" if config.spatial_dims == 3 else "hooks") if mode == "auto" else mode
        self.ledger = PrivacyLedger(self.cfg.accountant, self.cfg.delta, self.cfg.target_epsilon)
        self.noise_multiplier: float | None = self.cfg.noise_multiplier
        self.sample_rate: float | None = None
        self.messages: list[str] = []
        self._model: SynthesisModel | None = None
        self._dp_optimizers: dict[str, PairedDPOptimizer] = {}
        self._drawn: list[tuple[str, DrawnSample]] = []  # trainable groups outside DP, on drawn samples
        self._released: set[str] = set()
        self._private_loader: DataLoader | None = None
        self._ledger: tuple[DatasetLedger, str, str] | None = None  # the site's lifetime ledger, run, driver
        self.lifetime: LifetimeGuard | None = None
        self._prepare(model)

    # ------------------------------------------------------------------ model preparation

    def _say(self, message: str) -> None:
        self.messages.append(message)
        log.warning("privacy: %s", message)

    def _prepare(self, model: SynthesisModel) -> None:
        specs = model.group_specs()
        for group in self.groups:  # what the family declares each private group needs
            spec = specs[group]
            for switch in spec.privacy.switches:
                self._switch(model, spec.net, switch)
            for feature in spec.privacy.features:
                if feature.on:
                    feature.on = False
                    self._say(f"group '{group}': {feature.name} is off under DP ({feature.reason})")
            for freeze in spec.privacy.freezes:
                for message in freeze():
                    self._say(message)
        for name in self.net_names:
            net = model.nets[name]
            if ModuleValidator.validate(net, strict=False):
                before = {k: type(m).__name__ for k, m in net.named_modules()}
                fixed = ModuleValidator.fix(net)
                after = {k: type(m).__name__ for k, m in fixed.named_modules()}
                changed = sorted(f"{k} ({before[k]} -> {after.get(k, 'removed')})" for k in before if before[k] != after.get(k))
                model.nets[name] = fixed
                self._say(f"network '{name}': replaced {len(changed)} layer(s) Opacus cannot train privately: "
                          + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
            for module in model.nets[name].modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.register_forward_pre_hook(_contiguous_inputs)

    def _switch(self, model: SynthesisModel, net: str, switch: ConfigSwitch) -> None:
        """Apply one declared config switch to network ``net`` (a no-op when the setting is allowed)."""
        cfg = model.config.model
        if getattr(cfg, switch.setting) in switch.allowed:
            return
        setattr(cfg, switch.setting, switch.value)  # the stored config must rebuild the network trained
        try:
            model.nets[net] = model.build_net(net)
        except ValueError as err:
            raise ConfigError(f"privacy needs model.{switch.setting} = {_shown(switch.value)} "
                              f"({switch.reason}): {err}") from None
        self._say(f"network '{net}': {switch.change} (model.{switch.setting} set to {_shown(switch.value)} "
                  f"in the stored config; {switch.reason})")

    # ------------------------------------------------------------------ extension hooks

    def prepare_loader(self, model: SynthesisModel, optimizers: dict[str, torch.optim.Optimizer],
                       loader: DataLoader) -> tuple[dict[str, torch.optim.Optimizer], DataLoader]:
        """Private optimizers and a Poisson loader; a dataset already made private is reused."""
        if self._private_loader is None or self._private_loader.dataset is not loader.dataset:
            optimizers, self._private_loader = self.make_private(model, optimizers, loader)
        return optimizers, self._private_loader

    def stop_reason(self) -> str | None:
        return self.can_step()

    def attach_ledger(self, ledger: DatasetLedger, run: str, driver: str) -> None:
        """Account this run in the site's lifetime ledger too (checked and recorded from the next fit)."""
        self._ledger = (ledger, run, driver)

    def before_fit(self, data: Mapping[str, Any] | None, steps: int) -> None:
        """The site's lifetime budget: refuse a fit whose planned steps would pass it."""
        if self._ledger is None or data is None:
            return
        if self.lifetime is None or self.lifetime.fingerprint.get("sha256") != data.get("sha256"):
            ledger, run, driver = self._ledger
            self.lifetime = LifetimeGuard(ledger, run, driver, dict(data))
        assert self.noise_multiplier is not None and self.sample_rate is not None
        self.lifetime.check_plan(self.noise_multiplier, self.sample_rate, steps)

    def after_fit(self) -> None:
        if self.lifetime is not None:
            self.lifetime.record(self.ledger.epsilon)

    def before_save(self) -> None:
        self.after_fit()

    def make_private(self, model: SynthesisModel, optimizers: dict[str, torch.optim.Optimizer],
                     loader: DataLoader) -> tuple[dict[str, torch.optim.Optimizer], DataLoader]:
        """Wrap the private networks and optimizers (once) and return a Poisson-sampling loader."""
        dataset = loader.dataset
        n_data = len(dataset)  # type: ignore[arg-type]
        self.cfg.check_dataset_size(n_data)
        batch = self.config.training.batch_size
        self.sample_rate = min(1.0, batch / n_data)
        if self.noise_multiplier is None:
            self.noise_multiplier = self.planned_noise_multiplier(n_data)
            self._say(f"noise_multiplier {self.noise_multiplier:.3f} calibrated for epsilon {self.cfg.target_epsilon} "
                      f"at delta {self.cfg.delta} over {self.cfg.epochs or self.config.training.epochs} epoch(s) with sample rate {self.sample_rate:.4g}")
        self._wrap_networks(model)
        expected = max(1, round(self.sample_rate * n_data))
        k = len(self.groups)
        out = dict(optimizers)
        for group in self.groups:
            opt = optimizers[group]
            if isinstance(opt, PairedDPOptimizer):
                opt.expected_batch_size = expected
                continue
            dp = PairedDPOptimizer(opt, noise_multiplier=self.noise_multiplier * math.sqrt(k),
                                   max_grad_norm=self.cfg.max_grad_norm / math.sqrt(k),
                                   expected_batch_size=expected, loss_reduction="mean")
            dp.group = group
            dp.rows_per_example = model.group_specs()[group].privacy.rows_per_example
            dp.attach_step_hook(self._release_hook(group))
            self._dp_optimizers[group] = dp
            out[group] = dp
        self._model = model
        self._check_keys(model)
        self._fix_drawn_samples(model, expected)
        sampler = UniformWithReplacementSampler(num_samples=n_data, sample_rate=self.sample_rate)
        private_loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(self.config),
                                    num_workers=loader.num_workers)
        return out, private_loader

    def planned_noise_multiplier(self, n_data: int) -> float:
        """The noise multiplier training on ``n_data`` examples will use (given, kept, or calibrated now)."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        epochs = self.cfg.epochs or self.config.training.epochs
        sample_rate = min(1.0, self.config.training.batch_size / n_data)
        return self.ledger.calibrate(sample_rate, epochs * int(1 / sample_rate))

    def can_step(self) -> str | None:
        if self.noise_multiplier is None or self.sample_rate is None:
            return None
        lifetime_left = self.lifetime.steps_left(self.noise_multiplier, self.sample_rate) if self.lifetime else None
        if self.lifetime is not None and lifetime_left is not None and lifetime_left <= 0:
            budget = self.lifetime.budget
            assert budget is not None
            return (f"the site's lifetime privacy budget for this dataset is reached: one more step would exceed "
                    f"epsilon {budget.lifetime_epsilon:g} at delta {budget.delta:g} (ledger {self.lifetime.ledger.folder})")
        left = self.ledger.steps_allowed(self.noise_multiplier, self.sample_rate)
        if left is None or left > 0:
            return None
        return (f"privacy budget reached: one more step would exceed target_epsilon={self.cfg.target_epsilon} "
                f"(epsilon={self.ledger.epsilon:.4g} at delta={self.cfg.delta} after {self.ledger.steps} private steps)")

    def report(self) -> dict[str, float]:
        return {"epsilon": self.ledger.epsilon}

    def state_dict(self) -> dict[str, Any]:
        state = self.ledger.state_dict()
        state.update(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                     max_grad_norm=self.cfg.max_grad_norm, groups=list(self.groups),
                     grad_sample_mode=self.grad_sample_mode)
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None, model: SynthesisModel | None = None) -> None:
        if not state:
            return
        self.ledger.load_state_dict(state)
        if self.cfg.noise_multiplier is None and state.get("noise_multiplier"):
            self.noise_multiplier = float(state["noise_multiplier"])  # keep the calibrated noise of the run

    # ------------------------------------------------------------------ internals

    def _wrap_networks(self, model: SynthesisModel) -> None:
        for name in self.net_names:
            net = model.nets[name]
            if isinstance(net, GradSampleModule):
                continue  # already private: wrapping again would add every hook twice
            if isinstance(net, nn.parallel.DistributedDataParallel):
                raise ConfigError("privacy.enabled does not support multi-device (DDP) training; train with --devices 1")
            model.nets[name] = GradSampleModule(net, batch_first=True, loss_reduction="mean", strict=True,
                                                force_functorch=self.grad_sample_mode == "functorch")

    def _fix_drawn_samples(self, model: SynthesisModel, size: int) -> None:
        """Trainable groups outside DP that step on what the model draws: ``size`` draws every step."""
        self._drawn = []
        for group, spec in model.group_specs().items():
            drawn = spec.privacy.drawn
            if drawn is not None and spec.trainable and group not in self.groups:
                drawn.size = size
                self._drawn.append((group, drawn))

    def _release_hook(self, group: str) -> Callable[[DPOptimizer], None]:
        def hook(_optimizer: DPOptimizer) -> None:
            if group in self._released:
                raise RuntimeError(f"group '{group}' took two private steps on one batch; the accounting assumes one")
            self._released.add(group)

        return hook

    def wrap_training_step(self, model: SynthesisModel, step: TrainingStep | None = None) -> TrainingStep:
        """The step the engine calls under DP: ``step`` (default ``model.training_step``) plus the
        per-batch bookkeeping (one accounted mechanism per batch, noise-only steps on empty Poisson batches)."""
        plain_step = step or model.training_step

        def private_step(batch: Batch, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
            self._released.clear()
            for opt in self._dp_optimizers.values():
                opt.examples = len(batch)
            try:
                return self._noise_only_step(model, optimizers) if len(batch) == 0 else plain_step(batch, optimizers)
            finally:
                if self._released:
                    assert self.noise_multiplier is not None and self.sample_rate is not None
                    self.ledger.step(self.noise_multiplier, self.sample_rate)
                    if self.lifetime is not None:
                        self.lifetime.step(self.noise_multiplier, self.sample_rate)

        return private_step

    def _noise_only_step(self, model: SynthesisModel, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, float]:
        """An empty Poisson batch: every private group takes a zero-gradient, noised step (accounted),
        then every group outside DP that steps on drawn samples takes that step, as on any batch."""
        for opt in self._dp_optimizers.values():
            opt.zero_grad(set_to_none=True)
            for p in opt.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            opt.step()
            opt.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        stepped: list[DrawnSample] = []
        for group, drawn in self._drawn:
            if group in optimizers and not any(d is drawn for d in stepped):  # a sample shared by groups steps once
                stepped.append(drawn)
                metrics.update(drawn.step(optimizers))
        return metrics

    def _check_keys(self, model: SynthesisModel) -> None:
        for group in model.groups():
            for key in model.group_module(group).state_dict():
                if "_module." in key:
                    raise RuntimeError(f"Opacus prefix leaked into weight key '{group}{GROUP_SEP}{key}'")


class _EmptySafeCollate:
    """Collate that turns an empty Poisson sample into an empty :class:`Batch` of the right shape."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.shape = (0, config.channels, *config.image_size)
        self.conditional = config.num_classes > 0
        self.text = config.text is not None

    def __call__(self, items: list[tuple[torch.Tensor, int, str | None]]) -> Batch:
        if items:
            return collate(items)
        return Batch(torch.zeros(self.shape), torch.zeros(0, dtype=torch.long) if self.conditional else None,
                     [] if self.text else None)


def _shown(value: ConfigValue) -> str:
    """A config value as the YAML file spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"'{value}'" if isinstance(value, str) else str(value)


def _contiguous_inputs(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

