"""The OpenFL data loader of a fedsynth site: it only names the site's CSVs.

``plan/data.yaml`` maps each collaborator to its own *site data config* (``NAME,/abs/site.yaml``:
CSVs, state folder, privacy floor, which metrics may leave; see
:mod:`fedsynth.federated.site_config`), or, without a policy, to ``TRAIN_CSV`` or
``TRAIN_CSV,VAL_CSV`` (no privacy floor; every metric is shared). Images are read by the core
:class:`~fedsynth.federated.site.Site` (the same reader as ``fedsynth train``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openfl.federated.data.loader import DataLoader

from fedsynth.errors import DataError
from fedsynth.federated.site_config import SiteDataConfig, load_site_config


class FedsynthDataLoader(DataLoader):
    """Holds ``train_csv`` (and optional ``val_csv``) for one collaborator."""

    def __init__(self, data_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train_csv: Path | None = None
        self.val_csv: Path | None = None
        self.site_config: SiteDataConfig | None = None
        if data_path is None:  # `fx plan initialize` builds the model without data
            return
        parts = [p.strip() for p in str(data_path).split(",") if p.strip()]
        if len(parts) == 1 and parts[0].endswith((".yaml", ".yml")):
            self.site_config = load_site_config(parts[0], " (the collaborator's line in plan/data.yaml)")
            self.train_csv, self.val_csv = self.site_config.train_csv, self.site_config.val_csv
            return
        if not 1 <= len(parts) <= 2:
            raise DataError(f"plan/data.yaml: expected 'NAME,SITE_YAML', 'NAME,TRAIN_CSV' or 'NAME,TRAIN_CSV,VAL_CSV', "
                            f"got data path '{data_path}'")
        for p in parts:
            if not Path(p).is_file():
                raise DataError(f"plan/data.yaml: CSV not found: {p} (paths are relative to the workspace)")
        self.train_csv = Path(parts[0])
        self.val_csv = Path(parts[1]) if len(parts) == 2 else None

    def get_feature_shape(self) -> None:
        return None  # the model's geometry comes from the fedsynth config, not the data

    def get_train_data_size(self) -> int:
        raise NotImplementedError("FedsynthTaskRunner reports data sizes from its Site")

    def get_valid_data_size(self) -> int:
        raise NotImplementedError("FedsynthTaskRunner reports data sizes from its Site")
