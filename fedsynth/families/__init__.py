"""The family registry: one line per model family.

A family is described by a light module (``fedsynth/families/<name>.py``, pydantic only, no
torch): its config block (a :class:`~fedsynth.config_base.FamilyConfig` subclass with
``family: Literal["<name>"]``), its training recipe, its architecture rules and its test sizes,
gathered in a module-level ``FAMILY = Family(...)``. The networks live in a torch module
(``fedsynth/models/<name>.py``) that the spec names as ``"module:attribute"``; it is imported
only when a model is built, so validating a config, ``fedsynth --help`` and ``init-config``
never load torch. A family outside the package may keep both halves in one module.

Registering a family is one line in :data:`FAMILY_MODULES`; from there it reaches the config
union, ``init-config`` and the CLI's ``--family`` choices, the defaults, the geometry checks,
the test sizes and the OpenFL workspace templates.

A family whose model is built on a *first stage* (a model trained before it and frozen inside it:
latent diffusion's autoencoder) describes it with :attr:`Family.first_stage`; local training,
checkpoints and both federation backends ask :func:`first_stage` and never read the family's fields.

The registry is read once per process, when :mod:`fedsynth.config` is first imported (it builds
the ``model:`` union from it): extend :data:`FAMILY_MODULES` before that import, never after.
A family module must not import :mod:`fedsynth.config` at import time (it imports the families):
its type hints name ``ExperimentConfig`` under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fedsynth.config import ExperimentConfig
from fedsynth.errors import ConfigError

FAMILY_MODULES: tuple[str, ...] = (
    "fedsynth.families.autoencoder",
    "fedsynth.families.gan",
    "fedsynth.families.diffusion",
    "fedsynth.families.stylegan",
)


def resolve(reference: str | Callable[..., Any] | type[Any]) -> Any:
    """``"package.module:attribute"`` -> the attribute (imports the module); objects pass through."""
    if not isinstance(reference, str):
        return reference
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise ValueError(f"family reference {reference!r}: expected 'package.module:attribute'")
    return getattr(importlib.import_module(module_name), attribute)


class FirstStage(Protocol):
    """What a config says about its first stage: a model trained before the family's own and frozen
    inside it (latent diffusion: the autoencoder whose latents the UNet learns).

    A family's light module implements it (pydantic only); :attr:`Family.first_stage` returns one
    for a config that has a first stage. The weights themselves are the model's business
    (:meth:`fedsynth.models.base.SynthesisModel.first_stage`).
    """

    @property
    def kind(self) -> str:
        """What a run on this first stage is called in messages, e.g. ``"latent-diffusion"``."""
        ...

    @property
    def groups(self) -> tuple[str, ...]:
        """The frozen weight groups of the family's model that hold the first stage."""
        ...

    @property
    def checkpoint(self) -> str | None:
        """The trained first stage's checkpoint the config names (a path), or ``None``."""
        ...

    @property
    def pinned_sha256(self) -> str | None:
        """The hash a federation that ships the first stage pins (sites check what they receive), or ``None``."""
        ...

    @property
    def to_train(self) -> bool:
        """The config describes a first stage to train first and names no trained one."""
        ...

    def to_load(self) -> str | None:
        """The checkpoint to build the first stage from on this host: :attr:`checkpoint`, unless it is a
        shipped first stage whose copy is not here (its weights then come with the global model)."""
        ...

    def check_local_training(self) -> None:
        """Raise :class:`~fedsynth.errors.ConfigError` when local training cannot get the first stage."""
        ...

    def experiment(self) -> ExperimentConfig:
        """The first stage's own experiment: what trains it (same data, geometry and privacy)."""
        ...

    def trained_at(self, checkpoint: str) -> ExperimentConfig:
        """The config with its first stage trained, in ``checkpoint``."""
        ...

    def shipped(self, trained: ExperimentConfig, sha256: str) -> ExperimentConfig:
        """The config a federation sends its sites: the trained first stage's architecture (from
        ``trained``, its experiment config) pinned by ``sha256``, and no path on the sender's disk."""
        ...


def no_first_stage(config: Any) -> FirstStage | None:
    """:attr:`Family.first_stage` of a family whose models stand alone."""
    return None


@dataclass(frozen=True)
class Family:
    """What the rest of fedsynth knows about a model family."""

    name: str
    """The ``model.family`` tag, e.g. ``"gan"``."""
    config: type[Any]
    """The ``model:`` config block (a :class:`fedsynth.config_base.FamilyConfig`)."""
    model_ref: str | type[Any]
    """The :class:`~fedsynth.models.base.SynthesisModel` subclass built from an ExperimentConfig, as
    ``"module:Class"`` (imported on first use, see :attr:`model`) or the class itself."""
    recipe: Callable[..., dict[str, Any]]
    """``recipe(spatial_dims, image_size, **options) -> {"model": {...}, "training": {...}}``: the
    settings that work on small medical data (``init-config`` writes them out in full)."""
    test_model: dict[str, Any] = field(default_factory=dict)
    """``model:`` overrides that make the networks tiny, for tests."""
    check_geometry: Callable[[Any], None] | None = None
    """Raises ``ValueError("field '<path>': ...; nearest valid: ...")`` for a config it cannot build."""
    conditioning: tuple[str, ...] = ("none", "class")
    """What it can be conditioned on: ``none``, ``class`` (the CSV's Label), ``text`` (Prompt)."""
    options: tuple[str, ...] = ()
    """Extra keyword options its recipe takes (e.g. ``latent`` for diffusion)."""
    build_ref: str | Callable[..., Any] | None = None
    """``build(config, first_stage) -> model`` when building takes more than ``model(config)``
    (diffusion: the trained first-stage autoencoder of latent diffusion, given by the caller or
    loaded by :func:`fedsynth.models.build_model` from :meth:`FirstStage.to_load`, else ``None``),
    as ``"module:function"`` or the function. ``None``: :func:`fedsynth.models.build_model` calls
    ``model(config)``."""
    first_stage: Callable[[Any], FirstStage | None] = no_first_stage
    """``first_stage(config) -> FirstStage | None``: the config's first stage, ``None`` when it has none
    (always, by default). A family with one also has a :attr:`build` hook, which gets it trained."""

    @property
    def model(self) -> type[Any]:
        """The model class (imports its module, hence torch)."""
        model: type[Any] = resolve(self.model_ref)
        return model

    @property
    def build(self) -> Callable[..., Any] | None:
        """The build hook (imports its module), or ``None``."""
        return None if self.build_ref is None else resolve(self.build_ref)


@cache
def families() -> dict[str, Family]:
    """Every registered family, by name (imports their light modules: pydantic, no torch)."""
    found: dict[str, Family] = {}
    for module_name in FAMILY_MODULES:
        spec = importlib.import_module(module_name).FAMILY
        if spec.name in found:
            raise RuntimeError(f"family '{spec.name}' is registered twice ({module_name})")
        found[spec.name] = spec
    return found


def family(name: str) -> Family:
    """The registered family ``name``; a :class:`ConfigError` lists the known ones otherwise."""
    known = families()
    if name not in known:
        raise ConfigError(f"unknown family '{name}': expected one of {sorted(known)}")
    return known[name]


def first_stage(config: ExperimentConfig) -> FirstStage | None:
    """The first stage of ``config`` (its family's :attr:`Family.first_stage`), or ``None``."""
    return family(config.family).first_stage(config)


def family_names() -> list[str]:
    """The registered families' names, in registry order."""
    return list(families())
