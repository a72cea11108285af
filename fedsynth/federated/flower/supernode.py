"""``fedsynth-supernode``: flwr's own ``flower-supernode``, with a short idle poll and an atomic file store.

flwr 1.23's SuperNode sleeps a fixed 3 s each time it asks the SuperLink for a message and there
is none (``flwr.supernode.start_client_internal``, not configurable). Between two rounds that is
up to 3 s per round in which a site idles while the server already waits for it. This entry
runs the same SuperNode with the same arguments and behaviour, except that the idle wait is
``IDLE_POLL_S`` (one small gRPC request to the SuperLink per interval per site). Its file store
writes atomically (:func:`~fedsynth.federated.compat.atomic_flower_file_store`): flwr's rewrites a
file the site worker may be reading, which wedges the site.
"""

from __future__ import annotations

import sys

from fedsynth.federated.compat import atomic_flower_file_store, shorten_supernode_idle_poll

#: seconds a SuperNode waits before asking the SuperLink again when it had no message (flwr: 3)
IDLE_POLL_S = 0.25
#: exit status when the SuperLink does not let this SuperNode in yet (EX_TEMPFAIL: restart me later)
NOT_LET_IN = 75


def main() -> int:
    """Run ``flower-supernode`` with the arguments given (see ``flower-supernode --help``)."""
    from flwr.supernode.cli import flower_supernode

    shorten_supernode_idle_poll(IDLE_POLL_S)
    atomic_flower_file_store()
    sys.argv[0] = "flower-supernode"
    try:
        flower_supernode()
    except RuntimeError as err:
        if "generator didn't yield" not in str(err):
            raise
        # flwr 1.23 reports a refused activation as contextlib's "generator didn't yield"
        print("fedsynth-supernode: the SuperLink did not let this SuperNode in. Either its key is not "
              "registered (ask the operator: fedsynth federate flower-register), or the SuperLink still "
              "counts this site online from before it stopped (for up to 60 s, two missed heartbeats). "
              f"Exiting with status {NOT_LET_IN}: restart it in a few seconds (a service manager with "
              "Restart=always does) and it rejoins the next round.", file=sys.stderr)
        return NOT_LET_IN
    return 0


if __name__ == "__main__":
    sys.exit(main())
