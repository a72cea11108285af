"""``fedsynth federate <backend>``: run a federation (Flower now; OpenFL adds ``federate openfl``)."""

from __future__ import annotations

import argparse
from fedsynth.federated.flower.cli import add_flower_command
from fedsynth.federated.openfl.cli import add_openfl_parser


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedsynth federate`` with one sub-command per backend."""
    federate = subparsers.add_parser("federate", help="train across sites with a federated backend")
    backends = federate.add_subparsers(dest="backend", required=True)

    add_flower_command(backends)

    add_openfl_parser(backends)

