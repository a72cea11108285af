"""Architecture rules checked when a config is validated, before any model is built.

Each family's networks accept only some image sizes and channel counts (2x down/up-sampling
levels, GroupNorm groups). :func:`check_geometry` applies the same rules the model code relies
on and raises ``ValueError("field '<path>': <value> ...; nearest valid: ...")``, which
:mod:`fedsynth.config` reports as a :class:`~fedsynth.errors.ConfigError` naming the field.
The model constructors keep their own checks as a backstop, and
:func:`fedsynth.models.build_model` turns any build error into a ``ConfigError`` as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

GAN_GROUP_NORM_GROUPS = 8  # ConditionalDiscriminator's GroupNorm(num_groups=8)
PATCH_DISCRIMINATOR_GROUPS = 8  # PatchDiscriminator uses GroupNorm(min(8, channels))


def gan_levels(image_size: list[int] | tuple[int, ...]) -> int:
    """2x levels of the DCGAN nets: the coarsest map is 4 or more per side."""
    return max(1, int(math.log2(min(image_size) / 4)))


def _nearest(value: int, ok: Callable[[int], bool], lo: int = 1, span: int = 4096) -> str:
    below = next((v for v in range(value - 1, lo - 1, -1) if ok(v)), None)
    above = next((v for v in range(value + 1, value + span) if ok(v)), None)
    return ", ".join(str(v) for v in (below, above) if v is not None) or "none"


def _fail(field: str, value: Any, rule: str, nearest: str) -> None:
    raise ValueError(f"field '{field}': {value!r} {rule}; nearest valid: {nearest}")


def _size_rule(config: Any, field_rule: Callable[[list[int]], int | None], what: str) -> None:
    """``field_rule(size) -> required divisor`` or ``None`` when ``size`` is fine."""
    size = list(config.image_size)
    divisor = field_rule(size)
    if divisor is None:
        return
    square = len(set(size)) == 1

    def ok(v: int) -> bool:
        trial = [v] * len(size) if square else [v if s % divisor else s for s in size]
        return v >= 8 and field_rule(trial) is None

    bad = size[0] if square else next(s for s in size if s % divisor)
    _fail("image_size", size, f"must be divisible by {divisor} in every dimension ({what})", _nearest(bad, ok, lo=8))


def _check_gan(config: Any) -> None:
    m = config.model

    def rule(size: list[int]) -> int | None:
        d = 2 ** gan_levels(size)
        return d if any(s % d for s in size) else None

    _size_rule(config, rule, "the GAN halves the image once per level down to 4-7 pixels")
    if m.discriminator_norm == "group" and m.discriminator_channels % GAN_GROUP_NORM_GROUPS:
        _fail("model.discriminator_channels", m.discriminator_channels,
              f"must be a multiple of {GAN_GROUP_NORM_GROUPS} with discriminator_norm: group (GroupNorm of {GAN_GROUP_NORM_GROUPS} groups)",
              _nearest(m.discriminator_channels, lambda v: v % GAN_GROUP_NORM_GROUPS == 0))


def _check_groups(field: str, channels: list[int], groups: int, groups_field: str) -> None:
    for c in channels:
        if c % groups:
            valid_groups = _nearest(groups, lambda g: all(ch % g == 0 for ch in channels), span=max(channels) + 1)
            _fail(groups_field, groups, f"must divide every entry of {field} {channels} (GroupNorm); "
                  f"{c} is not a multiple", valid_groups)


def _check_autoencoder(config: Any) -> None:
    m = config.model
    if config.num_classes:
        _fail("num_classes", config.num_classes, "is for class-conditional families; autoencoders are unconditional", "0")
    levels = len(m.channels)
    if m.architecture == "kl":
        _check_groups("model.channels", list(m.channels), m.norm_num_groups, "model.norm_num_groups")
        divisor = 2 ** (levels - 1)
    else:
        divisor = 2**levels
    _size_rule(config, lambda size: divisor if any(s % divisor for s in size) else None,
               f"{levels} level(s) of the {m.architecture} autoencoder")
    if m.adversarial_weight > 0:
        c = m.discriminator_channels
        g = min(PATCH_DISCRIMINATOR_GROUPS, c)
        if c % g:
            _fail("model.discriminator_channels", c, f"must be a multiple of {g} (the patch discriminator's GroupNorm)",
                  _nearest(c, lambda v: v % min(PATCH_DISCRIMINATOR_GROUPS, v) == 0))
        # the first conv and each of the num_layers_d - 1 further ones halve the image, the last
        # two convolutions (kernel 4) take 2 more pixels: the smallest side must keep >= 3
        smallest = min(config.image_size)
        if smallest // 2**m.discriminator_layers < 3:
            fit = [v for v in range(1, 12) if smallest // 2**v >= 3]
            _fail("model.discriminator_layers", m.discriminator_layers,
                  f"halves image_size {list(config.image_size)} below 3 pixels (the patch discriminator)",
                  str(max(fit)) if fit else "none: image_size must be >= 6 with adversarial_weight > 0")


def _check_diffusion(config: Any) -> None:
    m = config.model
    levels = len(m.channels)
    _check_groups("model.channels", list(m.channels), m.norm_num_groups, "model.norm_num_groups")
    attention = m.attention_levels or [False] * (levels - 1) + [True]
    for c, att in zip(m.channels, attention):
        if att and c % m.num_head_channels:
            _fail("model.num_head_channels", m.num_head_channels,
                  f"must divide the channels {c} of every attention level",
                  _nearest(m.num_head_channels, lambda h: all(ch % h == 0 for ch, a in zip(m.channels, attention) if a), span=c + 1))
    if m.autoencoder_checkpoint:  # the UNet sees latents: their size is checked when the model is built
        return
    divisor = 2 ** (levels - 1)
    _size_rule(config, lambda size: divisor if any(s % divisor for s in size) else None,
               f"the UNet halves it {levels - 1} time(s) for {levels} levels of model.channels")


_RULES: dict[str, Callable[[Any], None]] = {"gan": _check_gan, "autoencoder": _check_autoencoder, "diffusion": _check_diffusion}


def check_geometry(config: Any) -> None:
    """Raise ``ValueError`` naming the field when ``config``'s model cannot be built or trained."""
    if config.text is not None:
        if config.model.family != "diffusion":
            _fail("text", "set", f"is text conditioning, which the diffusion family has and the {config.model.family} "
                  "family does not", "text: null, or model.family: diffusion")
        if config.num_classes:
            _fail("num_classes", config.num_classes, "and text conditioning exclude each other (write the class "
                  "into the Prompt column instead)", "0")
    rule = _RULES.get(config.model.family)
    if rule is not None:
        rule(config)
