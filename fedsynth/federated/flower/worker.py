"""A site's long-lived ClientApp process (``fedsynth federate flower-site-worker``).

By default a Flower SuperNode (``--isolation subprocess``) starts a fresh ``flwr-clientapp``
process for every message: each round re-imports torch, rebuilds the site's engine, re-reads
its images and reloads its state from disk. With ``--isolation process`` the SuperNode leaves
running the ClientApp to an outside process; this is that process. It asks the SuperNode's
ClientAppIo API (127.0.0.1 only, the same API flwr's own executor uses) for work and runs
each message with flwr's own :func:`~flwr.supernode.runtime.run_clientapp.run_clientapp`
*in this process*, so the ClientApp's site cache (:mod:`fedsynth.federated.flower.client_app`)
keeps the engine, the data and the state in memory between rounds. The site still writes its
state to ``state_dir`` after every round, so a restarted worker continues where it stopped.

The process isolation is the same: the SuperNode never runs fedsynth code, and the worker
only talks to its own SuperNode. ``--supernode-pid`` makes the worker exit with its SuperNode.

A site must not stay "online" while it cannot train: the worker exits with status 1 when its
SuperNode stops answering for ``UNREACHABLE_S`` seconds, or fails ``MAX_FAILED_MESSAGES``
messages in a row (e.g. every pull answered with an error), so the site's start script exits
and its service manager restarts both; the restarted site continues from its state on disk.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from fedsynth.federated.compat import clientappio_stub, record_clientapp_replies
from fedsynth.processes import exit_on_sigterm

log = logging.getLogger("fedsynth.flower.worker")

#: seconds without an answer from the SuperNode before the worker gives up and exits
UNREACHABLE_S = 60.0
#: messages in a row whose reply never reached the SuperNode before the worker exits
MAX_FAILED_MESSAGES = 3


class SiteWedged(SystemExit):
    """The worker cannot serve its SuperNode: exit non-zero so the site is restarted."""

    def __init__(self, why: str) -> None:
        log.error("site worker: %s; exiting so that the site's service manager restarts it", why)
        super().__init__(1)


def run_site_worker(clientappio_address: str, flwr_dir: str | None = None, *, supernode_pid: int | None = None,
                    poll_s: float = 0.2, unreachable_s: float = UNREACHABLE_S) -> None:
    """Serve ClientApp messages of the SuperNode at ``clientappio_address`` until it goes away
    (then raise :class:`SiteWedged`, exit status 1)."""
    from flwr.proto.appio_pb2 import ListAppsToLaunchRequest, RequestTokenRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    if supernode_pid is not None:
        start_parent_process_monitor(supernode_pid)  # exits (SIGKILL to itself) when the SuperNode is gone
    import fedsynth.federated.flower.client_app  # noqa: F401  (torch, MONAI and the app: imported once)

    channel, stub = clientappio_stub(clientappio_address, give_up_after_s=unreachable_s)
    replied = record_clientapp_replies()
    failed = 0  # messages in a row whose reply never reached the SuperNode
    busy: tuple[threading.Thread, int, str] | None = None  # the message being handled, its run and token

    def pending_runs() -> list[int]:
        try:
            return list(stub.ListAppsToLaunch(ListAppsToLaunchRequest()).run_ids)
        except Exception as err:  # grpc.RpcError once flwr's retries gave up: nobody to serve
            code = err.code() if callable(getattr(err, "code", None)) else None  # type: ignore[attr-defined]
            raise SiteWedged(f"the SuperNode at {clientappio_address} did not answer for {unreachable_s:.0f} s "
                             f"({getattr(code, 'name', type(err).__name__)})") from None

    def check(done: tuple[threading.Thread, int, str] | None) -> None:
        nonlocal failed
        if done is None or done[0].is_alive():
            return
        failed = 0 if done[2] in replied else failed + 1
        if failed >= MAX_FAILED_MESSAGES:
            raise SiteWedged(f"{failed} messages in a row failed between this worker and its SuperNode "
                             "(see the errors above)")

    log.info("fedsynth site worker: serving the SuperNode at %s", clientappio_address)
    try:
        while True:
            check(busy)
            run_ids = pending_runs()
            if busy is not None and busy[0].is_alive():
                # one message at a time; a message of *another* run while one still waits for its
                # inputs means that run is gone (e.g. a SuperLink restarted mid-round): serve the new one
                run_ids = [r for r in run_ids if r != busy[1]]
            token, run_id = "", 0
            for run_id in run_ids:
                token = stub.RequestToken(RequestTokenRequest(run_id=run_id)).token
                if token:
                    break
            if not token:
                time.sleep(poll_s)
                continue
            if busy is not None and busy[0].is_alive():
                log.warning("site worker: run %s never delivered its message; serving run %s", busy[1], run_id)
            thread = threading.Thread(target=run_clientapp, args=(clientappio_address, token),
                                      kwargs={"flwr_dir": flwr_dir}, name=f"clientapp-run-{run_id}", daemon=True)
            thread.start()
            busy = (thread, run_id, token)
            while thread.is_alive():  # the usual case: wait for it, but keep an eye on other runs
                thread.join(timeout=poll_s * 10)
                if thread.is_alive() and any(r != run_id for r in pending_runs()):
                    break
    finally:
        channel.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's command-line options (``fedsynth federate flower-site-worker`` and ``python -m``)."""
    parser.add_argument("--clientappio-api-address", default="127.0.0.1:9094", metavar="HOST:PORT",
                        help="the SuperNode's --clientappio-api-address (default 127.0.0.1:9094)")
    parser.add_argument("--flwr-dir", default=None, help="the SuperNode's --flwr-dir, if it has one")
    parser.add_argument("--supernode-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--unreachable-s", type=float, default=UNREACHABLE_S,
                        help=f"exit (status 1) when the SuperNode has not answered for this long (default {UNREACHABLE_S:g})")


def run_from_args(args: argparse.Namespace) -> int:
    """Configure logging, exit cleanly on SIGTERM, and serve until the SuperNode goes away."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedsynth").setLevel(logging.INFO)
    exit_on_sigterm()  # stopped by its service manager / the trial
    run_site_worker(args.clientappio_api_address, args.flwr_dir, supernode_pid=args.supernode_pid,
                    unreachable_s=args.unreachable_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsynth.federated.flower.worker`` (what the one-machine trial starts: no CLI import cost)."""
    parser = argparse.ArgumentParser(prog="python -m fedsynth.federated.flower.worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
