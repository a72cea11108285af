"""``fedsynth privacy budget | ledger``: a site's lifetime privacy budget and its audit.

Only argparse here: the accountant (Opacus, torch) loads inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedsynth.commands import command, examples
from fedsynth.data.manifest import fingerprint, read_manifest
from fedsynth.errors import ConfigError
from fedsynth.privacy.lifetime import LEDGER_ENV, Budget, DatasetLedger, default_ledger_dir


def _ledger_dir(args: argparse.Namespace) -> Path:
    folder = Path(args.ledger) if args.ledger else default_ledger_dir()
    if folder is None:
        raise ConfigError(f"no ledger folder: pass --ledger DIR or set {LEDGER_ENV}")
    return folder


@command("privacy budget")
def _budget(args: argparse.Namespace) -> None:
    ledger = DatasetLedger(_ledger_dir(args))
    budget = Budget(args.lifetime_epsilon, args.delta, args.accountant, args.max_epsilon_per_round, args.allow_non_private)
    entry = ledger.set_budget(budget)
    print(f"budget recorded in {ledger.path} (line {entry['seq']}): lifetime epsilon {budget.lifetime_epsilon:g} "
          f"at delta {budget.delta:g} ({budget.accountant})"
          + (f", at most {budget.max_epsilon_per_round:g} per round" if budget.max_epsilon_per_round else "")
          + (", non-private runs allowed" if budget.allow_non_private else ", non-private runs refused"))


@command("privacy ledger")
def _ledger(args: argparse.Namespace) -> None:
    ledger = DatasetLedger(_ledger_dir(args))
    hashes = None
    if args.data:
        hashes = set(fingerprint(read_manifest(args.data))["hashes"])  # type: ignore[call-overload]
    report = ledger.report(hashes)
    if args.json:
        print(json.dumps(report, indent=2, default=_json_number))
        return
    print(_text(report, args.data))


def _json_number(value: Any) -> Any:
    return str(value)


def _eps(value: float | None) -> str:
    if value is None:
        return "-"
    return "void (a non-private run)" if math.isinf(value) else f"{value:.4g}"


def _text(report: dict[str, Any], data: str | None) -> str:
    budget = report["budget"]
    lines = [f"ledger {report['ledger']}: {report['lines']} line(s), hash chain intact"]
    if budget is None:
        lines.append("budget: none recorded (fedsynth privacy budget --ledger DIR --lifetime-epsilon E --delta D)")
    else:
        lines.append(f"budget: lifetime epsilon {budget['lifetime_epsilon']:g} at delta {budget['delta']:g} "
                     f"({budget['accountant']})")
    lines.append(f"{'run':60s} {'driver':7s} {'images':>6s} {'steps':>7s} {'epsilon':>9s}")
    for row in report["runs"]:
        run = row["run"] if len(row["run"]) <= 60 else "..." + row["run"][-57:]
        lines.append(f"{run:60s} {str(row['driver']):7s} {row['images']!s:>6s} {row['steps']:>7d} "
                     f"{_eps(row.get('epsilon')):>9s}")
    scope = f"images of {data}" if data else "every dataset in the ledger"
    lines.append(f"lifetime guarantee for {scope}: epsilon {_eps(report['lifetime_epsilon_spent'])}"
                 + (f" at delta {report['delta']:g}" if report["delta"] is not None else " (no budget: no delta)"))
    return "\n".join(lines)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedsynth privacy budget | ledger``."""
    privacy = subparsers.add_parser(
        "privacy", help="the site's lifetime privacy budget per dataset, and its ledger", **examples(
            "fedsynth privacy budget --ledger /data/fedsynth/ledger --lifetime-epsilon 10 --delta 1e-5",
            "fedsynth privacy ledger --ledger /data/fedsynth/ledger --data train.csv"))
    sub = privacy.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")

    p = sub.add_parser("budget", help="record the site's lifetime budget (applies to every run on its data)", **examples(
        "fedsynth privacy budget --ledger /data/fedsynth/ledger --lifetime-epsilon 10 --delta 1e-5",
        "fedsynth privacy budget --ledger L --lifetime-epsilon 10 --delta 1e-5 --max-epsilon-per-round 1",
        description="Appends a budget line to the ledger (the latest applies; earlier ones stay on record). Every "
                    "private run that uses this ledger (fedsynth train --ledger, a site's data.yaml ledger_dir, or "
                    "FEDSYNTH_LEDGER) is refused before it trains when its planned steps would take any of its "
                    "images past lifetime_epsilon, and stops when it reaches it."))
    p.add_argument("--ledger", default=None, help="ledger folder (default: $FEDSYNTH_LEDGER)")
    p.add_argument("--lifetime-epsilon", type=float, required=True, help="epsilon no image may pass, over every run")
    p.add_argument("--delta", type=float, required=True, help="the delta of that guarantee (below 1/N)")
    p.add_argument("--accountant", choices=["rdp", "prv", "gdp"], default="rdp", help="how runs compose (default rdp)")
    p.add_argument("--max-epsilon-per-round", type=float, default=None,
                   help="cap on what one federated round (or one local train) may spend on its own")
    p.add_argument("--allow-non-private", action="store_true",
                   help="accept runs without DP (they void the lifetime guarantee; recorded)")
    p.set_defaults(command="privacy budget")

    p = sub.add_parser("ledger", help="each run's spend and the lifetime guarantee, the hash chain checked", **examples(
        "fedsynth privacy ledger --ledger /data/fedsynth/ledger",
        "fedsynth privacy ledger --ledger L --data train.csv --json"))
    p.add_argument("--ledger", default=None, help="ledger folder (default: $FEDSYNTH_LEDGER)")
    p.add_argument("--data", default=None, help="only runs on images of this CSV (by content, not path)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(command="privacy ledger")
