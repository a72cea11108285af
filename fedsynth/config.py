"""Experiment configuration: one YAML file, validated by pydantic.

Every block rejects unknown keys, so a misspelt option is an error rather than a silently
ignored setting. :func:`load_config` turns validation failures into one :class:`ConfigError`
that names the file, the field path, what was expected and what was given.

The ``model:`` block is one class per registered family (:mod:`fedsynth.families`); each lives
beside its model in ``fedsynth/models/<family>.py`` and is re-exported here
(``from fedsynth.config import GanConfig``).
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fedsynth.config_base import FamilyConfig
from fedsynth.config_base import Strict as _Strict
from fedsynth.errors import ConfigError
from fedsynth.families import families, family
from fedsynth.geometry import check_geometry, fail
from fedsynth.io import atomic_write_text

ModelT = TypeVar("ModelT", bound=BaseModel)


# --------------------------------------------------------------------------- models


class TextConfig(_Strict):
    """Text conditioning (diffusion): prompts from the CSV's Prompt column, cross-attention in the UNet."""

    encoder: Literal["transformer", "pretrained"] = Field(
        "transformer", description="transformer: hashed words + a small transformer trained jointly (its own group); "
                                   "pretrained: a frozen local Hugging Face text model (text.pretrained_dir)")
    pretrained_dir: str | None = Field(None, description="folder of a local pretrained text model (never downloaded)")
    vocab_size: int = Field(4096, ge=16, description="hash buckets for words (transformer encoder)")
    max_tokens: int = Field(16, ge=2, description="prompt length in tokens, longer prompts are cut")
    width: int = Field(64, ge=8, description="embedding width = the UNet's cross-attention dim")
    layers: int = Field(2, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (width must be divisible by heads)")
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="share of training prompts replaced by the empty "
                                                               "prompt, for classifier-free guidance")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextConfig:
        if self.width % self.heads:
            raise ValueError(f"field 'text.width': {self.width} must be divisible by text.heads ({self.heads})")
        return self


#: the ``model:`` block: one config class per registered family, told apart by ``family``. Built
#: from :data:`fedsynth.families.FAMILY_MODULES` once, when this module is first imported.
if TYPE_CHECKING:
    ModelConfig = FamilyConfig  # statically: some family's block (narrow it to reach the family's fields)
else:
    ModelConfig = Annotated[Union[tuple(spec.config for spec in families().values())], Field(discriminator="family")]  # noqa: UP007 (a union built at run time)
_FAMILY_TAGS = frozenset(families())


def __getattr__(name: str) -> Any:
    """``from fedsynth.config import GanConfig`` (or any registered family's config class)."""
    for spec in families().values():
        if spec.config.__name__ == name:
            return spec.config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- data


class AugmentationConfig(_Strict):
    """One MONAI random transform applied at train time."""

    name: Literal["flip", "rotate90", "affine", "gaussian_noise", "contrast", "intensity_shift"]
    prob: float = Field(0.5, ge=0, le=1)
    spatial_axis: int | None = Field(None, description="flip: axis (None = all)")
    rotate_range: float = Field(0.1, ge=0, description="affine: radians")
    scale_range: float = Field(0.1, ge=0, description="affine: relative")
    std: float = Field(0.02, ge=0, description="gaussian_noise: standard deviation")
    gamma: tuple[float, float] = Field((0.8, 1.2), description="contrast: gamma range")
    offset: float = Field(0.05, ge=0, description="intensity_shift: max offset")

    @model_validator(mode="after")
    def _gamma_ordered(self) -> AugmentationConfig:
        lo, hi = self.gamma
        if not 0 < lo <= hi:
            raise ValueError(f"gamma must satisfy 0 < low <= high, got {list(self.gamma)}")
        return self


class DataConfig(_Strict):
    """How images are read from the CSV, preprocessed and augmented."""

    resample_spacing: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, description="resample to this spacing (mm) first: one value per spatial dimension")
    resize_mode: Literal["resize", "crop_or_pad"] = Field(
        "resize", description="bring images to image_size by interpolation or by centre crop/pad"
    )
    normalization: Literal["minmax", "zscore", "percentile"] = Field(
        "minmax", description="per-image intensity normalisation; minmax and percentile give [0, 1]"
    )
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="percentile clip bounds")
    augmentations: list[AugmentationConfig] = Field(default_factory=list)
    val_fraction: float = Field(0.0, ge=0, lt=1, description="subjects held out when no --val-data")
    cache: bool = Field(True, description="keep preprocessed images in memory")

    @model_validator(mode="after")
    def _percentiles_ordered(self) -> DataConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        return self


# --------------------------------------------------------------------------- training


class TrainingConfig(_Strict):
    """The engine's loop: duration, optimisation, logging and checkpoints."""

    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also write last.ckpt every N steps inside an epoch (resume is exact from any step)"
    )
    batch_size: int = Field(16, ge=1, description="per process")
    learning_rate: float = Field(2e-4, gt=0, allow_inf_nan=False)
    group_learning_rates: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict, description="per-group override, e.g. {discriminator: 1e-4}"
    )
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.5, 0.999), description="Adam's (beta1, beta2), each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up: constant or cosine decay")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up (optimiser steps)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final learning rate / base learning rate")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip each group's gradient norm (non-private groups)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the generating groups for samples/generate (0 = off)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (1.6-2x on CPU)")
    num_workers: int = Field(0, ge=0)
    validate_every: int = Field(1, ge=1, description="epochs between validations")
    sample_every: int = Field(5, ge=1, description="epochs between PNG sample grids")
    num_sample_images: int = Field(16, ge=1)
    tensorboard: bool = True
    progress: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"


# --------------------------------------------------------------------------- federation / privacy


GroupPolicy = Literal["shared", "local"]


class FederationConfig(_Strict):
    """How a federation trains this model (used by the Flower and OpenFL drivers)."""

    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="cap on optimiser steps per round")
    min_sites: int = Field(2, ge=1)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    groups: dict[str, GroupPolicy] = Field(
        default_factory=dict, description="per group: shared (FedAvg) or local; missing = family default"
    )
    transport_dtype: Literal["float32", "float16"] = "float32"
    clip_update_norm: float | None = Field(None, gt=0, description="clip each site's update (L2)")
    round_timeout_s: float = Field(3600.0, gt=0)
    ema_decay: float = Field(0.7, ge=0, lt=1, description="server-side EMA of the global generating groups across rounds (0 = off)")
    weighting: Literal["samples", "equal"] = Field(
        "samples", description="FedAvg weights: each site's reported sample count, or equal (sites report their own counts)")
    max_site_samples: int | None = Field(None, ge=1, description="cap on one site's sample count in FedAvg weights")
    federation_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                      description="names this federation; each site keeps its state under "
                                                  "state_dir/<federation_id> (default: a hash of the config "
                                                  "without rounds and timeouts)")


class PrivacyConfig(_Strict):
    """Differential privacy (Opacus) on the groups that see real images (see docs/privacy.md)."""

    enabled: bool = False
    noise_multiplier: float | None = Field(
        None, gt=0, description="per-batch noise std / max_grad_norm; unset: calibrated from target_epsilon"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="privacy budget: training stops before a step would exceed it"
    )
    epochs: int | None = Field(
        None, ge=1, description="epochs target_epsilon is calibrated for (default training.epochs; "
                                "federations: rounds x local_epochs)"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="L2 bound on each example's gradient (all private groups together)")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    groups: list[str] | None = Field(None, description="default: the family's data-facing groups")
    grad_sample_mode: Literal["auto", "hooks", "functorch"] = Field(
        "auto", description="Opacus per-sample gradients; auto = hooks in 2D, functorch in 3D"
    )
    client_noise_multiplier: float | None = Field(
        None, gt=0, description="federations: server-side client-level DP noise (needs federation.clip_update_norm)"
    )
    client_delta: float = Field(1e-5, gt=0, lt=1, description="federations: delta of the client-level guarantee")

    def check_dataset_size(self, n: int) -> None:
        """``delta`` is the chance the guarantee fails outright: at 1/N or more it allows releasing one of
        the N training images, so it must stay below 1/N."""
        if self.delta >= 1 / n:
            raise ConfigError(f"field 'privacy.delta': {self.delta:g} is not below 1/N = 1/{n} for the {n} training "
                              f"images: the (epsilon, delta) guarantee would allow releasing one image outright; use "
                              f"delta < {1 / n:.2g} (1e-5 or less is usual)")

    @model_validator(mode="after")
    def _noise_or_budget(self) -> PrivacyConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy.enabled needs noise_multiplier or target_epsilon")
        return self


# --------------------------------------------------------------------------- experiment


class ExperimentConfig(_Strict):
    """A whole experiment: image geometry, model, data handling, training, federation, privacy."""

    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] = Field([64, 64], description="one size per spatial dimension")
    channels: int = Field(1, ge=1, description="image channels = number of Channel_* columns")
    num_classes: int = Field(0, ge=0, description="0: unconditional; >= 2: class-conditional on the CSV's Label")
    text: TextConfig | None = Field(None, description="text-conditional on the CSV's Prompt column (diffusion)")
    seed: int = Field(42, ge=0, lt=2**31, description="seeds every random number generator (0 <= seed < 2^31)")
    model: ModelConfig = Field(default_factory=lambda: family("gan").config())
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @field_validator("image_size", mode="before")
    @classmethod
    def _size_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @model_validator(mode="after")
    def _geometry(self) -> ExperimentConfig:
        if len(self.image_size) == 1:
            self.__dict__["image_size"] = self.image_size * self.spatial_dims
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(
                f"image_size has {len(self.image_size)} entries but spatial_dims is {self.spatial_dims}"
            )
        if any(s < 8 for s in self.image_size):
            raise ValueError(f"image_size entries must be >= 8, got {self.image_size}")
        if self.num_classes == 1:
            fail("num_classes", 1, "is one class: a class-conditional model needs two or more (0 = unconditional)", "0, 2")
        spacing = self.data.resample_spacing
        if spacing is not None and len(spacing) != self.spatial_dims:
            fail("data.resample_spacing", spacing, f"needs one spacing per spatial dimension ({self.spatial_dims})",
                 str([spacing[0]] * self.spatial_dims))
        for i, aug in enumerate(self.data.augmentations):
            if aug.spatial_axis is not None and not 0 <= aug.spatial_axis < self.spatial_dims:
                fail(f"data.augmentations.{i}.spatial_axis", aug.spatial_axis,
                     f"is not an axis of a {self.spatial_dims}D image", f"0..{self.spatial_dims - 1}, or null for all")

        check_geometry(self)
        return self

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def conditioning(self) -> Literal["none", "class", "text"]:
        """What generation is conditioned on: nothing, the CSV's Label, or its Prompt."""
        return "text" if self.text is not None else "class" if self.num_classes else "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (YAML/JSON/checkpoint safe)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _FAMILY_TAGS))
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _block_fields(e["loc"][:-1]), n=1, cutoff=0.6)
            msg = (f"unknown key (did you mean '{close[0]}'?)" if close
                   else "unknown key (check its spelling; see `fedsynth init-config` for all options)")
        elif e["type"] == "value_error" and str(e["msg"]).startswith("Value error, field '"):
            lines.append(f"  {str(e['msg'])[len('Value error, '):]}")  # a cross-field rule naming its own field
            continue
        else:
            msg = e["msg"]
        given_s = repr(given)
        if len(given_s) > 80:
            given_s = given_s[:77] + "..."
        lines.append(f"  field '{loc or '<root>'}': {msg}; got {given_s}")
    return "\n".join(lines)


def _block_fields(loc: tuple[Any, ...], block: type[BaseModel] | None = None) -> list[str]:
    """The field names of the config block at ``loc`` (a validation error's path), for a suggestion."""
    block = block or ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list of blocks (data.augmentations.0)
        if isinstance(part, str) and part in _FAMILY_TAGS:
            block = family(part).config  # the model: union, tagged by family
            continue
        info = block.model_fields.get(str(part))
        inner = [a for a in typing.get_args(info.annotation) or (info.annotation,)] if info is not None else []
        inner += [b for a in inner for b in typing.get_args(a)]  # list[Block], Block | None
        found = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if found is None:
            return []
        block = found
    return list(block.model_fields)


def with_overrides(config: ExperimentConfig, overrides: Mapping[str, Any],
                   source: str = "command-line options") -> ExperimentConfig:
    """``config`` with dotted fields replaced (``{"training.max_steps": 100}``), validated as a config file is."""
    if not overrides:
        return config
    data = config.to_dict()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        block = data
        for part in parents:
            block = block[part]
        block[leaf] = value
    return config_from_dict(data, source)


def validate_model(model: type[ModelT], data: Any, source: str) -> ModelT:
    """Validate ``data`` into the pydantic ``model``; one :class:`ConfigError` lists every problem.

    Validation is strict, as for JSON: ``true`` is not an integer, ``1`` and ``"yes"`` are not
    booleans, ``"3"`` and ``2.0`` are not integers (a YAML typo must not become a setting)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping at top level, got {type(data).__name__}")
    try:
        text = json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid configuration in {source}: only numbers, strings, true/false, null, lists and "
                          f"mappings are allowed ({err})") from None
    try:
        return model.model_validate_json(text, strict=True)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path, what: str = "config file", hint: str = "") -> Any:
    """Parse a YAML file; a missing file or a syntax error is a :class:`ConfigError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give the YAML file itself{hint}")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}{hint}")
    try:
        data = safe_load_unique(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte at offset {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if data is None:
        raise ConfigError(f"{what} {path} is empty (or only comments); write one with `fedsynth init-config`{hint}")
    return data


def config_from_dict(data: Any, source: str = "<dict>") -> ExperimentConfig:
    """Validate a mapping into an :class:`ExperimentConfig`, raising :class:`ConfigError`."""
    return validate_model(ExperimentConfig, data, source)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config."""
    return config_from_dict(read_yaml(path), str(path))


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the config as YAML, atomically."""

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- templates


def recipe(family_name: str, spatial_dims: int, size: list[int], **options: Any) -> dict[str, Any]:
    """The training recipe of a registered family for a geometry: model widths and training
    settings that work on small medical data sets (see docs/recipes.md). ``init-config`` writes it
    out in full. ``options`` are the family's own (:attr:`Family.options`, e.g. ``latent``)."""
    spec = family(family_name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(f"option '{unknown[0]}' is not one of the {family_name} family's "
                          f"({', '.join(spec.options) or 'it has none'})")
    return spec.recipe(spatial_dims, size, **options)


def default_config(family_name: str, spatial_dims: int, image_size: int | list[int], channels: int = 1,
                   num_classes: int = 0, latent: bool = False, text: bool = False) -> ExperimentConfig:
    """A complete config that trains as is, sized for the given geometry, with the family's recipe.

    ``latent``: the family's ``latent`` option (diffusion: latent diffusion on a first-stage
    autoencoder). ``text`` makes it text-conditional (families whose conditioning has ``text``)."""
    spec = family(family_name)
    if latent and "latent" not in spec.options:
        raise ConfigError(f"--latent is not an option of the {family_name} family "
                          f"(families with it: {', '.join(n for n, f in families().items() if 'latent' in f.options)})")
    if text and "text" not in spec.conditioning:
        raise ConfigError(f"text conditioning is not supported by the {family_name} family (it supports: "
                          f"{', '.join(spec.conditioning)}; text: {', '.join(n for n, f in families().items() if 'text' in f.conditioning)})")
    size = image_size if isinstance(image_size, list) else [image_size] * spatial_dims
    r = recipe(family_name, spatial_dims, size, **({"latent": True} if latent else {}))
    return config_from_dict({
        "spatial_dims": spatial_dims, "image_size": size, "channels": channels, "num_classes": num_classes,
        **({"text": {}} if text else {}),
        "model": r["model"],
        "data": {"augmentations": [{"name": "flip", "prob": 0.5, "spatial_axis": spatial_dims - 1}]},
        "training": {"batch_size": 16 if spatial_dims == 2 else 4, **r["training"]},
    }, f"defaults for {family_name}")


def render_yaml(config: ExperimentConfig) -> str:
    """YAML of ``config`` with each field's description as a comment (for ``init-config``)."""
    lines = [f"# fedsynth experiment config ({config.family}, {config.spatial_dims}D). Unknown keys are errors.",
             "# Validate with: fedsynth validate -c THIS_FILE --data data.csv",
             "# Train with:    fedsynth train -c THIS_FILE --data data.csv -o RUN_DIR"]
    _render(config, 0, lines)
    return "\n".join(lines) + "\n"


def _render(block: BaseModel, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for name, info in type(block).model_fields.items():
        value = getattr(block, name)
        comment = f"  # {info.description}" if info.description else ""
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()[0] if type(value).__doc__ else ""
            lines.append(f"{pad}{name}:{'  # ' + doc if doc else ''}")
            _render(value, indent + 1, lines)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:{comment}")
            for item in value:
                dumped = yaml.safe_dump([item.model_dump(mode="json", exclude_defaults=True) | {"name": item.name}],
                                        default_flow_style=None, sort_keys=False).rstrip()
                lines.extend(f"{pad}  {ln}" for ln in dumped.splitlines())
        else:
            dumped = yaml.safe_dump({name: _plain(value)}, default_flow_style=True, sort_keys=False).strip()[1:-1]
            lines.append(f"{pad}{dumped}{comment}")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
