"""Every place fedsynth reaches into Flower's or OpenFL's internals, in one module.

Each patch names the framework release series it was written against and checks it before it
touches anything: on another series it raises one clear :class:`~fedsynth.errors.FedsynthError`
(what was patched, which version it was written for, which one is installed) instead of
silently patching an attribute that no longer means the same thing. Moving to a new Flower or
OpenFL release means reading this module, nothing else.

Imports of the frameworks stay inside the functions: this module is imported by processes that
run one backend only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fedsynth.errors import FedsynthError

#: the release series each patch below was written and tested against
FLOWER_SERIES = ("1.23",)
OPENFL_SERIES = ("1.9",)


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (e.g. ``"flwr"``), or ``None``."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def require_series(distribution: str, series: tuple[str, ...], what: str) -> str:
    """The installed version of ``distribution`` when it belongs to one of ``series`` (``"1.23"``
    matches 1.23.x); otherwise a :class:`FedsynthError` naming ``what`` needs it."""
    found = installed_version(distribution)
    if found is None:
        raise FedsynthError(f"{what} needs {distribution} {' or '.join(series)}.x, which is not installed "
                            f"(pip install \"fedsynth[{'flower' if distribution == 'flwr' else 'openfl'}]\")")
    if not any(found == s or found.startswith(s + ".") for s in series):
        raise FedsynthError(f"{what} was written for {distribution} {' or '.join(s + '.x' for s in series)}, "
                            f"but {distribution} {found} is installed: install the supported series or update "
                            "fedsynth/federated/compat.py for it")
    return found


# --------------------------------------------------------------------------- Flower


def shorten_supernode_idle_poll(seconds: float) -> None:
    """flwr 1.23's SuperNode sleeps a fixed 3 s whenever it asks the SuperLink for a message and
    there is none (``flwr.supernode.start_client_internal``, not configurable); make that wait
    ``seconds``, leaving every other sleep of the loop as it is."""
    require_series("flwr", FLOWER_SERIES, "fedsynth-supernode's short idle poll")
    import flwr.supernode.start_client_internal as loop

    flwr_idle_s = 3

    class ShortIdlePoll:
        """Stands in for the ``time`` module inside flwr's SuperNode loop."""

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(wait: float) -> None:
            time.sleep(seconds if wait == flwr_idle_s else wait)

    loop.time = ShortIdlePoll()  # type: ignore[assignment]


def atomic_flower_file_store() -> None:
    """flwr 1.23's ``DiskFfs.put`` rewrites a run's FAB and its ``.META`` JSON in place for every
    message; the ClientApp process reading them at that moment gets an empty ``.META`` ("Expecting
    value: line 1 column 1") and its SuperNode answers every later pull with that error, so the
    site never trains again. Write both atomically (temporary file, then rename), and not at all
    when the stored content is already there."""
    require_series("flwr", FLOWER_SERIES, "the SuperNode's atomic file store")
    import hashlib
    import json
    import tempfile

    from flwr.supercore.ffs.disk_ffs import DiskFfs

    def replace(target: Any, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put(self: Any, content: bytes, meta: dict[str, str]) -> str:
        key = hashlib.sha256(content).hexdigest()
        self.base_dir.mkdir(exist_ok=True, parents=True)
        blob, about = self.base_dir / key, self.base_dir / f"{key}.META"
        encoded = json.dumps(meta).encode()
        if not (blob.is_file() and blob.stat().st_size == len(content)):
            replace(blob, content)
        if not (about.is_file() and about.read_bytes() == encoded):
            replace(about, encoded)
        return key

    DiskFfs.put = put  # type: ignore[method-assign]


#: the reason of the error reply the ServerApp sees for a reply whose upload never completed
INCOMPLETE_REPLY = "the site's reply never finished uploading"


def bound_reply_downloads(seconds_left: Callable[[], float]) -> None:
    """flwr 1.23's ``GrpcGrid.pull_messages`` downloads each reply's objects with up to two hours of
    retries (``PULL_MAX_TIME``); a site killed while uploading its reply leaves objects that never
    arrive, and the ServerApp, blocked in that download, never reaches its round timeout. Bound the
    download to ``seconds_left()`` (the rest of the round); a reply still incomplete then comes back
    as an error reply whose reason is :data:`INCOMPLETE_REPLY`."""
    require_series("flwr", FLOWER_SERIES, "the ServerApp's bounded reply download")
    import flwr.server.grid.grpc_grid as grid
    from flwr.common.inflatable_utils import ObjectUnavailableError, pull_objects

    class Incomplete(ObjectUnavailableError):
        def __init__(self) -> None:
            Exception.__init__(self, INCOMPLETE_REPLY)

    def bounded(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        kwargs["max_time"] = max(1.0, seconds_left())
        kwargs.setdefault("initial_backoff", 0.2)
        kwargs.setdefault("backoff_cap", 1.0)
        try:
            return pull_objects(*args, **kwargs)
        except ObjectUnavailableError as err:
            raise Incomplete() from err

    grid.pull_objects = bounded


def clientappio_stub(address: str, give_up_after_s: float | None = None) -> tuple[Any, Any]:
    """``(channel, stub)`` for a SuperNode's ClientAppIo API, with flwr's own retry policy (the
    same private helpers flwr's ``flwr-clientapp`` executor uses), except that an unreachable
    SuperNode is retried for ``give_up_after_s`` seconds (flwr: forever), then the call raises."""
    require_series("flwr", FLOWER_SERIES, "the fedsynth site worker (ClientAppIo API)")
    from flwr.common.grpc import create_channel
    from flwr.common.retry_invoker import _make_simple_grpc_retry_invoker, _wrap_stub
    from flwr.proto.clientappio_pb2_grpc import ClientAppIoStub

    channel = create_channel(server_address=address, insecure=True, root_certificates=None)
    stub = ClientAppIoStub(channel)
    invoker = _make_simple_grpc_retry_invoker()
    invoker.max_time = give_up_after_s
    _wrap_stub(stub, invoker)
    return channel, stub


def record_clientapp_replies() -> set[str]:
    """The tokens of the messages whose reply flwr's ``run_clientapp`` pushed to the SuperNode.

    flwr 1.23's ``run_clientapp`` logs a gRPC error and returns as it does after a success; the
    site worker needs to tell them apart (a SuperNode that fails every message leaves the site
    wedged). Returns the set the wrapped ``push_clientappoutputs`` adds each token to."""
    require_series("flwr", FLOWER_SERIES, "the fedsynth site worker (reply bookkeeping)")
    import flwr.supernode.runtime.run_clientapp as runtime

    pushed: set[str] = set()
    original = getattr(runtime.push_clientappoutputs, "__wrapped__", runtime.push_clientappoutputs)

    def push(stub: Any, token: str, message: Any, context: Any) -> Any:
        out = original(stub=stub, token=token, message=message, context=context)
        pushed.add(token)
        return out

    push.__wrapped__ = original  # type: ignore[attr-defined]
    runtime.push_clientappoutputs = push
    return pushed


# --------------------------------------------------------------------------- OpenFL


def openfl_persist_rounds_without_a_score() -> None:
    """OpenFL 1.9's aggregator stores its best validation score with every round in ``tensor.db``
    (``float(best_score)``); while no site has shared a validation loss (sites keep theirs unless
    their data config says ``share_metrics: [loss]``) that score is ``None``, the round cannot be
    stored and the federation hangs at the end of round 1. Store "no score yet" as ``-inf`` instead:
    any later score is better, and a restarted aggregator reads it back as the same "none yet".

    Applied by every ``GroupRoutedFedAvg`` (the plan's aggregation type), so for the fedsynth
    aggregator entry and ``fx aggregator start`` alike.
    """
    require_series("openfl", OPENFL_SERIES, "storing a round without a validation score")
    from openfl.databases.persistent_db import PersistentTensorDB

    original = PersistentTensorDB._save_round_and_best_score
    if getattr(original, "_fedsynth", False):
        return

    def save(self: Any, cursor: Any, round_number: int, best_score: float | None) -> None:
        original(self, cursor, round_number, float("-inf") if best_score is None else best_score)

    save._fedsynth = True  # type: ignore[attr-defined]
    PersistentTensorDB._save_round_and_best_score = save


def openfl_average_metrics_over_senders() -> None:
    """OpenFL 1.9 averages each validation metric over every collaborator of the task and returns
    ``None`` (then crashes on ``float(None)``) when one of them did not send it: a site that keeps its
    loss home (``share_metrics``) beside one that shares it, or a site that refused the round. Average
    a reported metric over the collaborators that sent it (their weights renormalised)."""
    require_series("openfl", OPENFL_SERIES, "averaging metrics over the sites that sent them")
    from openfl.databases.tensor_db import TensorDB
    from openfl.utilities import change_tags

    original = TensorDB.get_aggregated_tensor
    if getattr(original, "_fedsynth", False):
        return

    def get_aggregated_tensor(self: Any, tensor_key: Any, collaborator_weight_dict: dict[str, float],
                              aggregation_function: Any) -> Any:
        name, origin, fl_round, report, tags = tensor_key
        weights = dict(collaborator_weight_dict)
        if report and weights:
            db = self.tensor_db
            rows = db[(db["tensor_name"] == name) & (db["origin"] == origin) & (db["round"] == fl_round)
                      & (db["report"] == report)]["tags"]
            sent = {c: w for c, w in weights.items() if change_tags(tags, add_field=c) in set(rows)}
            if sent and len(sent) < len(weights):
                total = sum(sent.values())
                weights = {c: (w / total if total > 0 else 1.0 / len(sent)) for c, w in sent.items()}
        return original(self, tensor_key, weights, aggregation_function)

    get_aggregated_tensor._fedsynth = True  # type: ignore[attr-defined]
    TensorDB.get_aggregated_tensor = get_aggregated_tensor


def openfl_let_recovery_end_a_round() -> None:
    """OpenFL 1.9: an aggregator restarted from ``tensor.db`` replays the stored task results; when they
    complete a round, its metric writer's ``on_round_end`` runs before any ``on_round_begin`` /
    ``on_experiment_begin`` and crashes (``time.monotonic() - None``), so the restart fails. Open the
    writer's file and start its round clock on first use instead."""
    require_series("openfl", OPENFL_SERIES, "the aggregator's restart from tensor.db")
    from openfl.callbacks.metric_writer import MetricWriter

    if getattr(MetricWriter.on_round_end, "_fedsynth", False):
        return
    original = MetricWriter.on_round_end

    def on_round_end(self: Any, round_num: int, logs: Any = None) -> None:
        if self._log_file_handle is None:
            self.on_experiment_begin()
        if self._round_start_time is None:
            self._round_start_time = time.monotonic()
        original(self, round_num, logs)

    on_round_end._fedsynth = True  # type: ignore[attr-defined]
    MetricWriter.on_round_end = on_round_end


def openfl_set_idle_poll(seconds: float) -> None:
    """OpenFL tells a collaborator with no task to sleep a fixed 10 s, so a site that finished its
    round first starts the next one up to 10 s late; ask idle collaborators back after ``seconds``."""
    require_series("openfl", OPENFL_SERIES, "the aggregator's idle poll")
    from openfl.component.aggregator.aggregator import Aggregator

    Aggregator._get_sleep_time = staticmethod(lambda: seconds)


def openfl_bind(server: Any, host: str, port: int) -> None:
    """Make OpenFL's gRPC server listen on ``host`` only (OpenFL 1.9 hard-codes ``[::]:port``)."""
    require_series("openfl", OPENFL_SERIES, "binding the aggregator to one address")
    server.uri = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def openfl_check_collaborators(aggregator: Any, check: Callable[[Callable[[str, str], bool], str, str], bool]) -> None:
    """Route the aggregator's collaborator check through ``check(original, cert_cn, name)``
    (OpenFL 1.9: ``Aggregator.valid_collaborator_cn_and_id``), e.g. to log refusals and apply revocations."""
    require_series("openfl", OPENFL_SERIES, "the aggregator's collaborator check")
    original = aggregator.valid_collaborator_cn_and_id
    aggregator.valid_collaborator_cn_and_id = lambda cert_cn, name: check(original, cert_cn, name)


def end_openfl_aggregator(status: int, message: str) -> None:
    """End the aggregator process now with ``status``: OpenFL 1.9 turns an exception inside an
    aggregation function or straggler policy into a failed RPC and then waits for the round forever,
    and its gRPC threads keep a normal exit from completing."""
    print(f"fedsynth: the federation failed: {message}", file=sys.stderr, flush=True)
    os._exit(status)
