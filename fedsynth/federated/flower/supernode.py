"""``fedsynth-supernode``: flwr's own ``flower-supernode``, with a short idle poll.

flwr 1.23's SuperNode sleeps a fixed 3 s each time it asks the SuperLink for a message and there
is none (``flwr.supernode.start_client_internal``, not configurable). Between two rounds that is
up to 3 s per round in which a site idles while the server already waits for it. This entry
runs the same SuperNode with the same arguments and behaviour, except that the idle wait is
``IDLE_POLL_S`` (one small gRPC request to the SuperLink per interval per site).
"""

from __future__ import annotations

import sys
import time as _time
from typing import Any

#: seconds a SuperNode waits before asking the SuperLink again when it had no message (flwr: 3)
IDLE_POLL_S = 0.25
_FLWR_IDLE_S = 3


class _ShortIdlePoll:
    """Stands in for the ``time`` module inside flwr's SuperNode loop: only its 3 s idle sleep is shortened."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        _time.sleep(IDLE_POLL_S if seconds == _FLWR_IDLE_S else seconds)


def main() -> int:
    """Run ``flower-supernode`` with the arguments given (see ``flower-supernode --help``)."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    loop.time = _ShortIdlePoll()  # type: ignore[assignment]
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
