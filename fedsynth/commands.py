"""The table of ``fedsynth`` sub-commands: :mod:`fedsynth.cli` dispatches through it, and every
module that adds a sub-command registers its handler here with :func:`command`.

It lives apart from :mod:`fedsynth.cli` so that command modules in lower layers (``fedsynth.pki``,
``fedsynth.metrics.cli``, the federated backends' ``cli`` modules) never import the CLI itself.
It also holds what every command's parser shares: :class:`Parser` (``did you mean`` for a mistyped
choice) and :func:`examples` (the Examples section of each ``--help``).
"""

from __future__ import annotations

import argparse
import difflib
import time
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int | None]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of ``fedsynth NAME``."""

    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return deco


class Parser(argparse.ArgumentParser):
    """``argparse`` with a suggestion for a mistyped choice (``--family gn``: did you mean 'gan'?).

    Sub-parsers are built from the parent's class, so every sub-command gets it.
    """

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        names = [str(c) for c in choices]
        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise argparse.ArgumentError(action, f"invalid choice: '{value}' (choose from {', '.join(names)}){hint}")


def examples(*lines: str, description: str | None = None) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's ``--help`` with an Examples section (kept as written)."""
    out: dict[str, Any] = {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
                           "formatter_class": argparse.RawDescriptionHelpFormatter}
    if description is not None:
        out["description"] = description
    return out


def wall_time(seconds: float) -> str:
    """``"2 min 05 s"`` / ``"12.3 s"``: how long a command ran, as users read it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Stopwatch:
    """Wall time since it was made (``str(watch)`` formats it with :func:`wall_time`)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return wall_time(self.seconds)
