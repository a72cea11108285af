"""OpenFL task runner over the core engine: one :class:`~fedsynth.federated.site.Site` per
collaborator process.

Tensors are named by the core group keys (``generator/...``). Only ``shared`` groups ever leave
the site: :meth:`get_tensor_dict` and the train task return them alone, and ``local`` groups
stay in the site's state dir (``state_dir/<collaborator>/<federation id>/last.ckpt``) together with one
optimizer state per group (a GAN has two) and the privacy ledger. OpenFL's own optimizer
treatment (``opt_treatment``) is therefore ignored.

Tasks (names from plan.yaml): ``validate_task(apply=global)`` validates the aggregated model,
``train_task`` trains one round through :meth:`Site.train_round`, ``validate_task(apply=local)``
validates the locally tuned model. Validation reports ``score = -loss`` because OpenFL keeps the
model with the *highest* aggregated validation metric as ``best``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from openfl.federated.task.runner import TaskRunner
from openfl.utilities import TensorKey

from fedsynth.checkpoint import load_checkpoint
from fedsynth.engine import seed_everything
from fedsynth.errors import CheckpointError, ConfigError, PolicyRefused
from fedsynth.federated.aggregation import from_transport, resolve_group_policy, select_groups, shared_groups
from fedsynth.federated.openfl.common import CONFIG_IN_WORKSPACE, load_pinned_config
from fedsynth.federated.site import RoundResult, Site
from fedsynth.federated.site_config import REFUSED, SitePolicy, open_site_ledger
from fedsynth.models import build_model

log = logging.getLogger("fedsynth.openfl")

SCORE = "score"


class FedsynthTaskRunner(TaskRunner):
    """Task runner named in plan.yaml (``task_runner.template``)."""

    def __init__(self, data_loader: Any, config_path: str = CONFIG_IN_WORKSPACE, config_sha256: str | None = None,
                 state_dir: str = "local_state/fedsynth", **kwargs: Any) -> None:
        super().__init__(data_loader=data_loader, **kwargs)
        self.config = load_pinned_config(config_path, config_sha256)
        seed_everything(self.config.seed)
        self.model = build_model(self.config)  # initial weights (fx plan initialize) and tensor names
        self.policy = resolve_group_policy(self.model, self.config.federation)
        self.shared = shared_groups(self.policy)
        self.state_dir = Path(state_dir)
        self.site: Site | None = None
        self.required_tensorkeys_for_function: dict[str, Any] = {}
        self.opt_treatment = "CONTINUE_LOCAL"
        self._valid_size = 0
        self.initialize_tensorkeys_for_functions()

    # ------------------------------------------------------------------ site

    def _site(self, col_name: str) -> Site:
        if self.site is None:
            loader = self.data_loader
            if loader is None or getattr(loader, "train_csv", None) is None:
                raise RuntimeError(f"collaborator '{col_name}' has no training CSV in plan/data.yaml")
            data = getattr(loader, "site_config", None)
            if data is not None and data.site_id != col_name:
                raise ConfigError(f"collaborator '{col_name}': its site data config names site_id '{data.site_id}'")
            state_dir = data.state_dir if data is not None and data.state_dir is not None else self.state_dir / col_name
            # a collaborator whose plan/data.yaml line names CSVs only has declared no floor: the safe default
            policy = SitePolicy.of(data) if data is not None else SitePolicy.default()
            self.site = Site(self.config, loader.train_csv, state_dir, site_id=col_name, val_csv=loader.val_csv,
                             policy=policy, ledger=open_site_ledger(data), driver="openfl",
                             keep_local=data.keep_local if data is not None else ())
            log.info("site %s: %d training images, groups %s (local: %s)", col_name, self.site.num_samples,
                     self.policy, [g for g in self.policy if g not in self.shared])
        return self.site

    def _current_model(self) -> Any:
        return self.site.engine.model if self.site is not None else self.model

    def _incoming(self, input_tensor_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global tensors from OpenFL (float32 on the wire) back in the model's dtypes."""
        reference = self._current_model().get_weights(self.shared)
        missing = sorted(set(reference) - set(input_tensor_dict))
        if missing:
            raise RuntimeError(f"the aggregator sent no tensor '{missing[0]}' ({len(missing)} missing)")
        return from_transport({k: input_tensor_dict[k] for k in reference}, reference)

    # ------------------------------------------------------------------ tasks

    def train_task(self, col_name: str, round_num: int, input_tensor_dict: dict[str, np.ndarray],
                   **kwargs: Any) -> tuple[dict[TensorKey, np.ndarray], dict[TensorKey, np.ndarray]]:
        """Train one round on this site; send the shared groups and the round's metrics.

        A round the site's own policy refuses (its floor, its lifetime privacy budget) is answered
        with the weights it received and ``refused:<field>`` metrics: the aggregator counts the
        site as rejected instead of waiting for it, and learns which fields, never their values
        (those stay in this collaborator's log)."""
        try:
            site = self._site(col_name)
            result = site.train_round(self._incoming(input_tensor_dict), round_num + 1)
        except PolicyRefused as err:
            log.warning("%s", err)
            received = self._incoming(input_tensor_dict)
            result = RoundResult(received, 1, {f"{REFUSED}{field}": 1.0 for field in err.fields or ("privacy policy",)})
        out: dict[TensorKey, np.ndarray] = {
            TensorKey(name, col_name, round_num, True, ("metric",)): np.array(value, dtype=np.float32)
            for name, value in sorted(result.metrics.items())
        }
        for name, array in result.weights.items():
            out[TensorKey(name, col_name, round_num, False, ("trained",))] = np.asarray(array, dtype=np.float32)
        return out, {}

    def validate_task(self, col_name: str, round_num: int, input_tensor_dict: dict[str, np.ndarray],
                      apply: str = "global", **kwargs: Any) -> tuple[dict[TensorKey, np.ndarray], dict[TensorKey, np.ndarray]]:
        """Validate the aggregated (``apply=global``) or locally tuned (``apply=local``) model."""
        try:
            site = self._site(col_name)
        except PolicyRefused:
            return {}, {}  # a site that refuses the federation reports nothing (its train task says why)
        loss, n, metrics = site.evaluate(self._incoming(input_tensor_dict))
        self._valid_size = n
        suffix = "validate_agg" if apply == "global" else "validate_local"
        out: dict[TensorKey, np.ndarray] = {}
        if loss is not None:  # the site's policy may keep its loss in (then OpenFL keeps no `best`)
            out[TensorKey(SCORE, col_name, round_num, True, ("metric", suffix))] = np.array(-loss, dtype=np.float32)
        if apply != "global":  # OpenFL compares every validate_agg metric with `best`: keep that one alone
            for name, value in metrics.items():
                out[TensorKey(f"val_{name}", col_name, round_num, True, ("metric", suffix))] = np.array(value, dtype=np.float32)
        log.info("site %s round %d %s: loss %s on %d images", col_name, round_num, suffix,
                 "withheld" if loss is None else f"{loss:.5f}", n)
        return out, {}

    # ------------------------------------------------------------------ OpenFL API

    def get_train_data_size(self) -> int:
        return self.site.num_samples if self.site is not None else 0

    def get_valid_data_size(self) -> int:
        return self._valid_size

    def get_tensor_dict(self, with_opt_vars: bool = False) -> dict[str, np.ndarray]:
        """The shared groups only (``local`` groups are never handed to OpenFL)."""
        return {k: np.asarray(v, dtype=np.float32) for k, v in self._current_model().get_weights(self.shared).items()}

    def set_tensor_dict(self, tensor_dict: dict[str, np.ndarray], with_opt_vars: bool = False) -> None:
        model = self._current_model()
        model.set_weights(from_transport(select_groups(tensor_dict, self.shared), model.get_weights(self.shared)), strict=True)

    def reset_opt_vars(self) -> None:
        """Optimizer states are per group and stay on the site (see module docstring)."""

    def initialize_globals(self) -> None:
        """Nothing to do: the model is built from the config."""

    def set_optimizer_treatment(self, opt_treatment: str) -> None:
        self.opt_treatment = opt_treatment
        if opt_treatment != "CONTINUE_LOCAL":
            log.info("opt_treatment %s ignored: fedsynth keeps one optimizer state per group on each site", opt_treatment)

    def initialize_tensorkeys_for_functions(self, with_opt_vars: bool = False) -> None:
        names = list(self.model.get_weights(self.shared))
        global_model = [TensorKey(n, "GLOBAL", 0, False, ("model",)) for n in names]
        self.required_tensorkeys_for_function = {
            "train_task": global_model,
            "validate_task": {
                "apply=global": global_model,
                "apply=local": [TensorKey(n, "LOCAL", 0, False, ("trained",)) for n in names],
            },
        }

    def get_required_tensorkeys_for_function(self, func_name: str, **kwargs: Any) -> list[TensorKey]:
        if func_name == "validate_task":
            return self.required_tensorkeys_for_function[func_name][f"apply={kwargs['apply']}"]
        return self.required_tensorkeys_for_function[func_name]

    def load_native(self, filepath: str, **kwargs: Any) -> None:
        """``fx plan initialize -i run/last.ckpt``: start the federation from a fedsynth checkpoint."""
        payload = load_checkpoint(filepath)
        if payload.get("family") != self.model.family:
            raise CheckpointError(f"{filepath} is a {payload.get('family')} checkpoint; this plan trains a {self.model.family}")
        weights = {k: v.numpy() for k, v in payload["weights"].items()}
        self.model.set_weights(select_groups(weights, self.shared), strict=True)

    def save_native(self, filepath: str, **kwargs: Any) -> str:
        from fedsynth.checkpoint import TrainingState, save_checkpoint

        return str(save_checkpoint(filepath, self._current_model(), TrainingState(), rng=False))
