"""A site's lifetime privacy ledger: every private training run on its data, in one hash-chained file.

A run's ``epsilon`` (:class:`~fedsynth.privacy.ledger.PrivacyLedger`) covers that run. A patient's
guarantee covers every run that ever trained on their image: local runs, resumed runs, and
federations of either backend, each with its own run folder and federation id. This ledger is the
site's record of all of them, kept in a folder the site chooses (``ledger_dir`` in a site's data
config, ``fedsynth train --ledger DIR``, or ``FEDSYNTH_LEDGER`` for every command on the machine):

- ``ledger.jsonl``: append-only lines, each carrying the SHA-256 of the line before it (``prev``)
  and of itself (``hash``); ``ledger.head`` holds the number of lines and the last hash, so an
  edited, reordered, removed or truncated line is reported (:class:`LedgerTampered`).
- ``budget`` lines: the site's ``lifetime_epsilon`` at ``delta``, an optional cap per round (one
  federated round or one local ``train``), whether non-private runs are allowed. A new budget
  is a new line: loosening it is on the record.
- ``spend`` lines: the mechanisms a run executed on a dataset since its previous line, as the
  accountant's history ``[(noise_multiplier, sample_rate, steps)]``. Steps are recorded as they
  are taken (at every checkpoint and at the end of every fit), never subtracted: a run resumed
  from an older checkpoint records its redone steps again, which only overstates the spend.
- ``datasets/<sha256>.json``: each dataset's image content hashes (not paths).

The guarantee of a dataset is the composition of every recorded spend on any dataset that shares
an image with it (an image's spend counts wherever it was trained), at the ledger's ``delta``,
with its accountant: the histories are concatenated, as Opacus composes steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.errors import ConfigError, FedsynthError, PolicyRefused
from fedsynth.io import atomic_write_text

#: environment variable naming the machine's ledger folder (used when a command is given none)
LEDGER_ENV = "FEDSYNTH_LEDGER"
LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "ledger.head"
GENESIS = "0" * 64

History = list[tuple[float, float, int]]


class LedgerTampered(FedsynthError):
    """The ledger's hash chain does not hold: a line was edited, removed, reordered or truncated."""


class BudgetExceeded(PolicyRefused):
    """Training would take a dataset past the site's lifetime budget (or a round past its cap)."""


@dataclass(frozen=True)
class Budget:
    """The site's budget for every dataset in the ledger."""

    lifetime_epsilon: float
    delta: float
    accountant: str = "rdp"
    max_epsilon_per_round: float | None = None
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        if not (self.lifetime_epsilon > 0 and math.isfinite(self.lifetime_epsilon)):
            raise ConfigError(f"lifetime_epsilon must be a positive number, got {self.lifetime_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise ConfigError(f"accountant must be one of rdp, prv, gdp, got '{self.accountant}'")
        if self.max_epsilon_per_round is not None and not self.max_epsilon_per_round > 0:
            raise ConfigError(f"max_epsilon_per_round must be positive, got {self.max_epsilon_per_round}")


def default_ledger_dir() -> Path | None:
    """The machine's ledger folder from ``FEDSYNTH_LEDGER``, if set."""
    value = os.environ.get(LEDGER_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class DatasetLedger:
    """One site's lifetime ledger in ``folder`` (created on first write)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"ledger folder {self.folder} is a file; give a folder")

    @property
    def path(self) -> Path:
        return self.folder / LEDGER_FILE

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[dict[str, Any]]:
        """Every line, the chain checked (raises :class:`LedgerTampered` naming the first bad line)."""
        if not self.path.is_file():
            if (self.folder / HEAD_FILE).is_file():
                raise LedgerTampered(f"{self.path} is missing but {self.folder / HEAD_FILE} records lines: "
                                     "the ledger was deleted")
            return []
        out: list[dict[str, Any]] = []
        prev = GENESIS
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    raise LedgerTampered(f"{self.path} line {number} is not JSON: the ledger was edited") from None
                if not isinstance(entry, dict) or entry.get("prev") != prev or _digest(entry) != entry.get("hash"):
                    raise LedgerTampered(f"{self.path} line {number} does not match its hash chain: the ledger was "
                                         "edited, or a line was removed or reordered; its figures cannot be trusted")
                prev = entry["hash"]
                out.append(entry)
        head = self._head()
        if head is not None:
            # the head is written after each append: lines beyond it are an append whose head update
            # did not land (a crash in between), lines missing before it were removed
            lines = head.get("lines")
            if not isinstance(lines, int) or lines > len(out) or (lines and out[lines - 1]["hash"] != head.get("hash")):
                raise LedgerTampered(f"{self.path} has {len(out)} line(s) but {self.folder / HEAD_FILE} records "
                                     f"{lines}: lines were removed from its end")
        return out

    def _head(self) -> dict[str, Any] | None:
        path = self.folder / HEAD_FILE
        if not path.is_file():
            return None
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise LedgerTampered(f"{path} is unreadable: the ledger's head was edited") from None
        return head if isinstance(head, dict) else None

    def budget(self) -> Budget | None:
        """The latest budget line, if the site set one."""
        last = next((e for e in reversed(self.entries()) if e.get("kind") == "budget"), None)
        if last is None:
            return None
        return Budget(float(last["lifetime_epsilon"]), float(last["delta"]), str(last["accountant"]),
                      last.get("max_epsilon_per_round"), bool(last.get("allow_non_private", False)))

    def dataset_hashes(self, sha256: str) -> set[str]:
        path = self.folder / "datasets" / f"{sha256}.json"
        try:
            return set(json.loads(path.read_text(encoding="utf-8"))["hashes"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return set()

    def spends(self, hashes: set[str] | None = None) -> list[dict[str, Any]]:
        """Spend lines on any dataset sharing an image with ``hashes`` (every spend when ``None``)."""
        lines = [e for e in self.entries() if e.get("kind") == "spend"]
        if hashes is None:
            return lines
        overlap: dict[str, bool] = {}
        out = []
        for e in lines:
            sha = str(e.get("dataset"))
            if sha not in overlap:
                overlap[sha] = bool(self.dataset_hashes(sha) & hashes)
            if overlap[sha]:
                out.append(e)
        return out

    @staticmethod
    def history_of(spends: Sequence[dict[str, Any]]) -> History | None:
        """The concatenated accountant history of ``spends`` (``None``: a non-private run voids it)."""
        history: History = []
        for e in spends:
            if e.get("non_private"):
                return None
            history += [(float(s), float(q), int(n)) for s, q, n in e.get("history", [])]
        return history

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".ledger.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # concurrent runs on one machine append in turn
            yield
        finally:
            os.close(fd)

    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self._locked():
            lines = self.entries()
            entry = {"seq": len(lines) + 1, "time": round(time.time(), 3), **entry,
                     "prev": lines[-1]["hash"] if lines else GENESIS}
            entry["hash"] = _digest(entry)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            atomic_write_text(self.folder / HEAD_FILE, json.dumps({"lines": len(lines) + 1, "hash": entry["hash"]}))
        return entry

    def set_budget(self, budget: Budget) -> dict[str, Any]:
        """Record the site's budget (a new line; the latest one applies)."""
        return self._append({"kind": "budget", "lifetime_epsilon": budget.lifetime_epsilon, "delta": budget.delta,
                             "accountant": budget.accountant, "max_epsilon_per_round": budget.max_epsilon_per_round,
                             "allow_non_private": budget.allow_non_private})

    def register_dataset(self, fingerprint: dict[str, Any]) -> str:
        """Store a dataset's image hashes (once); returns its SHA-256."""
        sha = str(fingerprint["sha256"])
        path = self.folder / "datasets" / f"{sha}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"sha256": sha, "images": fingerprint["images"],
                                                "hashes": list(fingerprint["hashes"])}))
        return sha

    def record(self, run: str, fingerprint: dict[str, Any], history: History | None, *, driver: str,
               epsilon_run: float | None = None) -> dict[str, Any]:
        """A spend line: ``history`` (new mechanisms of ``run`` on the dataset), or a non-private run (``None``)."""
        sha = self.register_dataset(fingerprint)
        entry: dict[str, Any] = {"kind": "spend", "run": run, "driver": driver, "dataset": sha,
                                 "images": fingerprint["images"]}
        if history is None:
            entry["non_private"] = True
        else:
            entry["history"] = [[float(s), float(q), int(n)] for s, q, n in history]
            entry["epsilon_run"] = epsilon_run
        return self._append(entry)

    # ------------------------------------------------------------------ audit

    def report(self, hashes: set[str] | None = None) -> dict[str, Any]:
        """Each run's spend and the lifetime guarantee (of the datasets sharing an image with ``hashes``)."""
        from fedsynth.privacy.ledger import PrivacyLedger

        budget = self.budget()
        spends = self.spends(hashes)
        delta = budget.delta if budget else None
        accountant = budget.accountant if budget else "rdp"
        runs: dict[tuple[str, str], dict[str, Any]] = {}
        for e in spends:
            row = runs.setdefault((e["run"], e["dataset"]), {"run": e["run"], "driver": e.get("driver"),
                                                            "dataset": e["dataset"], "images": e.get("images"),
                                                            "steps": 0, "non_private": False, "history": [],
                                                            "first": e["time"], "last": e["time"]})
            row["last"] = e["time"]
            if e.get("non_private"):
                row["non_private"] = True
            else:
                row["history"] += e.get("history", [])
                row["steps"] += sum(int(n) for _, _, n in e.get("history", []))
        total: float | None = None
        if delta is not None:
            acc = PrivacyLedger(accountant, delta)
            for row in runs.values():
                row["epsilon"] = math.inf if row["non_private"] else acc.epsilon_of([tuple(h) for h in row["history"]])
            history = self.history_of(spends)
            total = math.inf if history is None else acc.epsilon_of(history)
        for row in runs.values():
            del row["history"]
        return {"ledger": str(self.folder), "lines": len(self.entries()),
                "budget": None if budget is None else budget.__dict__, "runs": list(runs.values()),
                "lifetime_epsilon_spent": total, "delta": delta}


class LifetimeGuard:
    """What one training run may still spend on its dataset under the site's budget.

    Built once the dataset and the mechanism are known; ``check_plan`` refuses a round whose
    planned steps would pass the lifetime budget or the per-round cap, ``steps_left`` stops a run
    at the budget, ``record`` writes what was taken.
    """

    def __init__(self, ledger: DatasetLedger, run: str, driver: str, fingerprint: dict[str, Any]) -> None:
        from fedsynth.privacy.ledger import PrivacyLedger

        self.ledger, self.run, self.driver, self.fingerprint = ledger, run, driver, fingerprint
        self.budget = ledger.budget()
        hashes = set(fingerprint["hashes"])
        prior = ledger.history_of(ledger.spends(hashes))
        if prior is None and self.budget is not None:
            raise BudgetExceeded(f"the privacy ledger {ledger.folder} records a non-private run on images of this "
                                 "dataset: its lifetime guarantee is void, no further private run can keep it",
                                 ("lifetime privacy budget",))
        self.prior: History = prior or []
        self.unrecorded: History = []
        self.accountant = PrivacyLedger(self.budget.accountant if self.budget else "rdp",
                                        self.budget.delta if self.budget else 1e-5,
                                        self.budget.lifetime_epsilon if self.budget else None)

    def _epsilon(self, history: History) -> float:
        return self.accountant.epsilon_of(history)

    def spent(self) -> float:
        return self._epsilon(self.prior + self.unrecorded)

    def check_plan(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Refuse before training when ``steps`` more batches would pass the budget or the round cap."""
        if self.budget is None or steps <= 0:
            return
        planned = [(noise_multiplier, sample_rate, steps)]
        after = self._epsilon(self.prior + self.unrecorded + planned)
        if after > self.budget.lifetime_epsilon:
            raise BudgetExceeded(
                f"the site's lifetime privacy budget for this dataset ({self.fingerprint['images']} images) is epsilon "
                f"{self.budget.lifetime_epsilon:g} at delta {self.budget.delta:g}; {self.spent():.4g} is spent "
                f"(ledger {self.ledger.folder}) and the {steps} planned step(s) would take it to {after:.4g}: refused "
                "before training", ("lifetime privacy budget",))
        cap = self.budget.max_epsilon_per_round
        if cap is not None and (one := self._epsilon(planned)) > cap:
            raise BudgetExceeded(f"the {steps} planned step(s) of this round would spend epsilon {one:.4g} on their "
                                 f"own; the site allows at most {cap:g} per round (ledger {self.ledger.folder})",
                                 ("privacy budget per round",))

    def steps_left(self, noise_multiplier: float, sample_rate: float) -> int | None:
        """Batches left before the lifetime budget (``None``: no budget)."""
        if self.budget is None:
            return None
        self.accountant.history = self.prior + self.unrecorded
        return self.accountant.steps_allowed(noise_multiplier, sample_rate)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if self.unrecorded and self.unrecorded[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.unrecorded[-1]
            self.unrecorded[-1] = (s, q, n + 1)
        else:
            self.unrecorded.append((noise_multiplier, sample_rate, 1))

    def record(self, epsilon_run: float | None = None) -> None:
        """Write the steps taken since the last line (nothing when none were)."""
        if not self.unrecorded:
            return
        self.ledger.record(self.run, self.fingerprint, self.unrecorded, driver=self.driver, epsilon_run=epsilon_run)
        self.prior += self.unrecorded
        self.unrecorded = []


def check_non_private(ledger: DatasetLedger, run: str, driver: str, fingerprint: dict[str, Any]) -> None:
    """A run without DP on a dataset in the ledger: refused when the site keeps a budget that does not
    allow it; otherwise recorded (the dataset's lifetime guarantee is void from then on)."""
    budget = ledger.budget()
    if budget is not None and not budget.allow_non_private:
        raise BudgetExceeded(f"the site keeps a lifetime privacy budget for its data (ledger {ledger.folder}, epsilon "
                             f"{budget.lifetime_epsilon:g}); a run without differential privacy (privacy.enabled: "
                             "false) is refused. Enable privacy, or record a budget with --allow-non-private",
                             ("privacy.enabled",))
    ledger.record(run, fingerprint, None, driver=driver)
