"""``fedsynth federate openfl``: the one-machine OpenFL trial (see :mod:`.trial`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsynth.errors import ConfigError, require


def add_openfl_parser(federate_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``openfl`` under the ``federate`` sub-command (handler registered as ``federate openfl``)."""
    from fedsynth.cli import command

    p = federate_subparsers.add_parser(
        "openfl", help="one-machine OpenFL federation: fx workspace, mTLS on 127.0.0.1, export",
        description="Builds an OpenFL workspace from plans/<family>, runs the fx PKI flow, one aggregator "
                    "(bound to 127.0.0.1) and one collaborator per --site, then exports RUN_DIR/last.ckpt "
                    "and best.ckpt. Every process is stopped at the end, also on failure.")
    p.add_argument("-c", "--config", required=True, help="fedsynth experiment YAML")
    p.add_argument("--site", action="append", required=True, metavar="NAME=TRAIN_CSV[,VAL_CSV]",
                   help="one collaborator (repeat per site)")
    p.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    p.add_argument("-o", "--output", required=True, help="run folder (workspace, logs, checkpoints)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for the federation before every process is stopped (default: rounds x round_timeout_s + 300)")
    p.set_defaults(command="federate openfl")
    command("federate openfl")(run_openfl_command)
    return p


def parse_sites(values: list[str]) -> dict[str, tuple[Path, Path | None]]:
    sites: dict[str, tuple[Path, Path | None]] = {}
    for value in values:
        name, sep, paths = value.partition("=")
        parts = [x for x in paths.split(",") if x]
        if not sep or not name or not 1 <= len(parts) <= 2:
            raise ConfigError(f"--site '{value}': expected NAME=TRAIN_CSV or NAME=TRAIN_CSV,VAL_CSV")
        if name in sites:
            raise ConfigError(f"--site: collaborator name '{name}' given twice")
        sites[name] = (Path(parts[0]), Path(parts[1]) if len(parts) == 2 else None)
    return sites


def run_openfl_command(args: argparse.Namespace) -> int:
    require("openfl", "openfl", "fedsynth federate openfl")
    from fedsynth.config import load_config
    from fedsynth.federated.openfl.trial import run_trial

    config = load_config(args.config)
    result = run_trial(config, parse_sites(args.site), Path(args.output), rounds=args.rounds, timeout=args.timeout)
    for row in result.rounds_metrics:
        shown = {k.split("/")[-2] + "/" + k.split("/")[-1]: v for k, v in row.items()
                 if k.startswith("aggregator/") and k.rsplit("/", 1)[-1] in ("score", "train_loss")}
        print(f"round {row.get('round_number')}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    for which, path in result.checkpoints.items():
        print(f"{which}: {path}")
    print(f"workspace: {result.workspace} (per-round metrics: logs/aggregator_metrics.txt, logs/<site>_metrics.txt)")
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    return 0
