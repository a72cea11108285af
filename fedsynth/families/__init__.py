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
from typing import Any

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
    (diffusion: the trained first-stage autoencoder of latent diffusion, given or loaded from its
    checkpoint), as ``"module:function"`` or the function. ``None``:
    :func:`fedsynth.models.build_model` calls ``model(config)``."""

    @property
    def model(self) -> type[Any]:
        """The model class (imports its module, hence torch)."""
        return resolve(self.model_ref)

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
        from fedsynth.errors import ConfigError

        raise ConfigError(f"unknown family '{name}': expected one of {sorted(known)}")
    return known[name]


def family_names() -> list[str]:
    """The registered families' names, in registry order."""
    return list(families())
