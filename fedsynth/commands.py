"""The table of ``fedsynth`` sub-commands: :mod:`fedsynth.cli` dispatches through it, and every
module that adds a sub-command registers its handler here with :func:`command`.

It lives apart from :mod:`fedsynth.cli` so that command modules in lower layers (``fedsynth.pki``,
``fedsynth.metrics.cli``, the federated backends' ``cli`` modules) never import the CLI itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int | None]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of ``fedsynth NAME``."""

    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn

    return deco
