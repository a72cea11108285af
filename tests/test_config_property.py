"""A config that validates never crashes: configs drawn from the schema (Hypothesis) either fail
validation with a :class:`FedsynthError` or train one step on real brain slices.

Each example starts from a family's tiny test config and changes up to three scalar fields of any
block (the family's ``model:`` block included) to values drawn by the field's type: small and
boundary numbers, wrong types, unknown choices. The draw is derandomized (the same examples on
every run) and bounded, so this runs in the fast tier; about a third of the drawn configs validate
and train.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_cases import _scalar

from fedsynth.config import DataConfig, FederationConfig, PrivacyConfig, TrainingConfig, config_from_dict
from fedsynth.errors import FedsynthError
from fedsynth.families import families

pytestmark = pytest.mark.filterwarnings("ignore")

#: fields left out of the draw: worker processes (slow, not a config question) and file paths
NOT_DRAWN = {"training.num_workers", "model.autoencoder_checkpoint", "model.first_stage_sha256", "federation.federation_id"}


def _fields(block: Any, prefix: str) -> list[tuple[str, Any]]:
    out = []
    for name, info in block.model_fields.items():
        path = f"{prefix}.{name}"
        kind, choices, optional = _scalar(info.annotation)
        if name == "family" or path in NOT_DRAWN or (kind is None and choices is None):
            continue
        out.append((path, _values(kind, choices, optional)))
    return out


def _values(kind: type | None, choices: tuple[Any, ...] | None, optional: bool) -> st.SearchStrategy[Any]:
    junk = st.sampled_from(["junk", True, -1, 1e9])
    if choices is not None:
        values: st.SearchStrategy[Any] = st.sampled_from(list(choices))
    elif kind is bool:
        values = st.booleans()
    elif kind is int:
        values = st.integers(-2, 48)  # bounded: a drawn width must not make a model too slow for the fast tier
    elif kind is float:
        values = st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.sampled_from([0.0, 1.0, float("nan"), 1e-12]))
    else:
        values = st.text(max_size=4)
    return st.one_of(values, junk, st.none()) if optional else st.one_of(values, junk)


SHARED = [*_fields(TrainingConfig, "training"), *_fields(DataConfig, "data"), *_fields(FederationConfig, "federation"),
          *_fields(PrivacyConfig, "privacy"),
          ("spatial_dims", st.sampled_from([2, 3, 1])), ("image_size", st.sampled_from([16, 24, 32, 12, 7])),
          ("num_classes", st.integers(0, 4)), ("seed", st.integers(-1, 2**31))]


@st.composite
def drawn_configs(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(families())))
    spec = families()[name]
    data: dict[str, Any] = {
        "spatial_dims": 2, "image_size": 16, "seed": 0,
        "model": {"family": name, **copy.deepcopy(spec.test_model)},
        "training": {"epochs": 1, "batch_size": 4, "progress": False, "tensorboard": False, "sample_every": 100,
                     "num_sample_images": 2},
    }
    pool = SHARED + _fields(spec.config, "model")
    for _ in range(draw(st.integers(1, 3))):
        path, values = draw(st.sampled_from(pool))
        value = draw(values)
        if "." in path:
            section, field = path.split(".")
            data.setdefault(section, {})[field] = value
        else:
            data[path] = value
    return data


#: examples per run (about a third validate and train a step); FEDSYNTH_PROPERTY_EXAMPLES=500 for a long search
EXAMPLES = int(os.environ.get("FEDSYNTH_PROPERTY_EXAMPLES", "20"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=drawn_configs())
def test_a_drawn_config_fails_validation_or_trains_a_step(data: dict[str, Any], mri2d: dict[str, Any],
                                                          mri3d: dict[str, Any]) -> None:
    from fedsynth.data import load_datasets
    from fedsynth.engine import build_engine

    try:
        config = config_from_dict(data, "drawn.yaml")
    except FedsynthError:
        return  # refused where the config is read, naming the field
    csv = str((mri2d if config.spatial_dims == 2 else mri3d)["mni152"])
    try:
        train, _ = load_datasets(config, csv)
        engine = build_engine(config, None)
        engine.fit(train, max_steps=1)
    except FedsynthError:
        return  # refused before or while training with one clear error
    assert engine.state.step == 1 or engine.state.step == 0 and config.privacy.enabled  # DP may stop at its budget
