"""``fedsynth federate <backend>``: run a federation (Flower now; OpenFL adds ``federate openfl``)."""

from __future__ import annotations

import argparse

from fedsynth.commands import examples
from fedsynth.federated.flower.cli import add_flower_command
from fedsynth.federated.openfl.cli import add_openfl_parser


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedsynth federate`` with one sub-command per backend."""
    federate = subparsers.add_parser("federate", help="train across sites with a federated backend", **examples(
        "fedsynth federate flower -c cfg.yaml --site site1=a.csv --site site2=b.csv --rounds 3 -o runs/fl",
        "fedsynth federate openfl -c cfg.yaml --site site1=a.csv --site site2=b.csv --rounds 3 -o runs/ofl",
        "fedsynth federate flower-app -c cfg.yaml --run-dir run --superlink agg:9093 --ca ca.crt -o app"))
    backends = federate.add_subparsers(dest="backend", required=True, metavar="BACKEND")

    add_flower_command(backends)

    add_openfl_parser(backends)

