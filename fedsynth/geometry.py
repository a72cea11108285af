"""Architecture rules checked when a config is validated, before any model is built.

Each family's networks accept only some image sizes and channel counts (2x down/up-sampling
levels, GroupNorm groups). Each family states its own rules (``Family.check_geometry``, written
with the helpers here); :func:`check_geometry` applies them and the conditioning rules every
family shares (``Family.conditioning``). They raise
``ValueError("field '<path>': <value> ...; nearest valid: ...")``, which :mod:`fedsynth.config`
reports as a :class:`~fedsynth.errors.ConfigError` naming the field.
The model constructors keep their own checks as a backstop, and
:func:`fedsynth.models.build_model` turns any build error into a ``ConfigError`` as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsynth.families import families


def nearest(value: int, ok: Callable[[int], bool], lo: int = 1, span: int = 4096) -> str:
    """The nearest values below and above ``value`` for which ``ok`` holds (for error messages)."""
    below = next((v for v in range(value - 1, lo - 1, -1) if ok(v)), None)
    above = next((v for v in range(value + 1, value + span) if ok(v)), None)
    return ", ".join(str(v) for v in (below, above) if v is not None) or "none"


def fail(field: str, value: Any, rule: str, nearest: str) -> None:
    """Raise the ``ValueError`` :mod:`fedsynth.config` reports as a field error."""
    raise ValueError(f"field '{field}': {value!r} {rule}; nearest valid: {nearest}")


def size_rule(config: Any, field_rule: Callable[[list[int]], int | None], what: str) -> None:
    """Check ``image_size`` with ``field_rule(size) -> required divisor`` (``None``: ``size`` is fine);
    the error names the nearest sizes that pass. ``what`` says which architecture needs it."""
    size = list(config.image_size)
    divisor = field_rule(size)
    if divisor is None:
        return
    square = len(set(size)) == 1

    def ok(v: int) -> bool:
        trial = [v] * len(size) if square else [v if s % divisor else s for s in size]
        return v >= 8 and field_rule(trial) is None

    bad = size[0] if square else next(s for s in size if s % divisor)
    fail("image_size", size, f"must be divisible by {divisor} in every dimension ({what})", nearest(bad, ok, lo=8))


def check_groups(field: str, channels: list[int], groups: int, groups_field: str) -> None:
    """GroupNorm: ``groups`` (the field ``groups_field``) must divide every entry of ``channels``."""
    for c in channels:
        if c % groups:
            valid_groups = nearest(groups, lambda g: all(ch % g == 0 for ch in channels), span=max(channels) + 1)
            fail(groups_field, groups, f"must divide every entry of {field} {channels} (GroupNorm); "
                 f"{c} is not a multiple", valid_groups)


def check_geometry(config: Any) -> None:
    """Raise ``ValueError`` naming the field when ``config``'s model cannot be built or trained."""

    spec = families().get(config.model.family)
    if spec is None:  # not a registered family: the config union has already refused it
        return
    if config.conditioning not in spec.conditioning:
        able = [name for name, f in families().items() if config.conditioning in f.conditioning]
        if config.conditioning == "text":
            fail("text", "set", f"is text conditioning, which the {spec.name} family does not have "
                 f"(families with it: {', '.join(able)})", f"text: null, or model.family: {' / '.join(able)}")
        kind = ("unconditional" if spec.conditioning == ("none",)
                else "conditional on " + " or ".join(c for c in spec.conditioning if c != "none") + " only")
        fail("num_classes", config.num_classes, f"is for class-conditional families ({', '.join(able)}); "
             f"the {spec.name} family is {kind}", "0")
    if config.text is not None and config.num_classes:
        fail("num_classes", config.num_classes, "and text conditioning exclude each other (write the class "
             "into the Prompt column instead)", "0")
    if spec.check_geometry is not None:
        spec.check_geometry(config)
