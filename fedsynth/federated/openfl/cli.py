"""``fedsynth federate openfl``: the one-machine OpenFL trial (see :mod:`.trial`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsynth.commands import command, examples
from fedsynth.errors import require


def add_openfl_parser(federate_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``openfl`` under the ``federate`` sub-command (handler registered as ``federate openfl``)."""

    p = federate_subparsers.add_parser(
        "openfl", help="one-machine OpenFL federation: fx workspace, mTLS on 127.0.0.1, export",
        **examples("fedsynth federate openfl -c cfg.yaml --site site1=a_train.csv --site site2=b_train.csv,b_val.csv "
                   "--rounds 3 -o runs/ofl"),
        description="Builds the family's OpenFL workspace from plans/workspace, runs the fx PKI flow, one aggregator "
                    "(bound to 127.0.0.1) and one collaborator per --site, writing RUN_DIR/global/{last,best,round_NNNN}.ckpt "
                    "and history.json as the Flower trial does. Every process is stopped at the end, also on failure.")
    p.add_argument("-c", "--config", required=True, help="fedsynth experiment YAML")
    p.add_argument("--site", action="append", required=True, metavar="ID=TRAIN_CSV[,VAL_CSV]",
                   help="one collaborator (repeat per site)")
    p.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    p.add_argument("-o", "--output", required=True, help="run folder (workspace, logs, checkpoints)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for the federation before every process is stopped (default: rounds x round_timeout_s + 300)")
    p.set_defaults(command="federate openfl")
    command("federate openfl")(run_openfl_command)
    return p


def run_openfl_command(args: argparse.Namespace) -> int:
    require("openfl", "openfl", "fedsynth federate openfl")
    from fedsynth.federated.openfl.trial import run_trial
    from fedsynth.federated.trial_common import TrialRequest, parse_sites

    result = run_trial(TrialRequest(args.config, parse_sites(args.site), Path(args.output).resolve(), args.rounds,
                                    timeout_s=args.timeout))
    for row in result.history:
        m = row.get("metrics", {})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k in ("train_loss",))
        val = row.get("val_loss")
        print(f"round {row['round']}: {shown or 'no metrics'}" + (f", val_loss={val:.4g}" if val is not None else "")
              + f"; rejected: {'; '.join(r for _, r in row.get('rejected', [])) or 'none'}")
    print(f"global model: {result.checkpoint}" + (f" (best: {result.best})" if result.best else ""))
    print(f"workspace: {result.workspace} (OpenFL's logs: logs/aggregator.log, logs/collaborator_<site>.log)")
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    return 0
