"""Bad config values drawn from the schema itself: for every scalar field of every config block
(each registered family's ``model:`` block included), a value of the wrong type and, where the
field has a bound, a value just past it. Used by tests/test_bad_inputs.py."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel

from fedsynth.config import DataConfig, FederationConfig, PrivacyConfig, TrainingConfig
from fedsynth.families import families

#: fields whose bad values need another field to matter, or that name files (checked elsewhere)
SKIP = {"privacy.groups", "federation.groups", "training.group_learning_rates", "model.autoencoder_checkpoint",
        "model.first_stage", "model.first_stage_sha256", "model.attention_levels", "model.augment",
        "federation.federation_id", "data.augmentations", "data.percentiles", "data.resample_spacing"}


def _scalar(annotation: Any) -> tuple[type | None, tuple[Any, ...] | None, bool]:
    """(int/float/bool/str, Literal choices, optional) of a field's annotation; (None, None, _) otherwise."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            return None, None, optional
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return None, typing.get_args(annotation), optional
    if annotation in (int, float, bool, str):
        return annotation, None, optional
    return None, None, optional


def _past_bound(kind: type, metadata: list[Any]) -> list[Any]:
    out = []
    for m in metadata:
        if isinstance(m, at.Ge):
            out.append(m.ge - 1 if kind is int else m.ge - 0.5)
        elif isinstance(m, at.Gt):
            out.append(m.gt if kind is int else m.gt - 0.5)
        elif isinstance(m, at.Le):
            out.append(m.le + 1)
        elif isinstance(m, at.Lt):
            out.append(m.lt)
    return out


def bad_values(block: type[BaseModel], prefix: str) -> Iterator[tuple[str, Any, str]]:
    """``(field path, bad value, what the error must name)`` for each scalar field of ``block``."""
    for name, info in block.model_fields.items():
        path = f"{prefix}.{name}"
        if path in SKIP or name == "family":
            continue
        kind, choices, _ = _scalar(info.annotation)
        if choices is not None:
            yield path, "no-such-choice", path
        elif kind is bool:
            yield path, 1, path
            yield path, "yes", path
        elif kind is int:
            yield path, True, path
            yield path, 2.5, path
            for value in _past_bound(int, info.metadata):
                yield path, value, path
        elif kind is float:
            yield path, "fast", path
            for value in _past_bound(float, info.metadata):
                yield path, value, path


def schema_cases() -> list[tuple[str, str, Any]]:
    """``(family, field path, bad value)`` over the shared blocks (with the GAN) and every family's model block."""
    cases: list[tuple[str, str, Any]] = []
    for block, prefix in ((TrainingConfig, "training"), (DataConfig, "data"), (FederationConfig, "federation"),
                          (PrivacyConfig, "privacy")):
        cases += [("gan", path, value) for path, value, _ in bad_values(block, prefix)]
    for name, spec in families().items():
        cases += [(name, path, value) for path, value, _ in bad_values(spec.config, "model")]
    return cases
