"""``fedsynth federate flower`` (placeholder until the driver lands)."""
import argparse


def add_flower_command(backends: argparse._SubParsersAction) -> None:
    """Register ``federate flower``."""
    backends.add_parser("flower", help="one-machine Flower federation")
