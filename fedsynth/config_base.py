"""The base of every config block (kept apart so that family modules can define their own block)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every config block: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FamilyConfig(Strict):
    """Base of a family's ``model:`` block; each family narrows ``family`` to its own ``Literal`` tag.

    Statically, ``ExperimentConfig.model`` is this type: code that needs a family's own fields
    narrows it first (``assert isinstance(config.model, DiffusionConfig)``)."""

    family: str
