"""``fedsynth federate flower`` (one-machine trial) and ``fedsynth federate flower-app`` (deployment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedsynth.commands import command, examples
from fedsynth.errors import ConfigError, require
from fedsynth.federated.flower.bundle import FEDERATION, AppSpec, write_app
from fedsynth.federated.flower.worker import add_arguments, run_from_args


def _print_event(event: dict[str, Any], _federation: object) -> None:
    kind = event["event"]
    if kind == "start":
        print(f"federation: {event['family']}, rounds {event['start_round']}..{event['rounds']}, "
              f"groups {event['policy']}, transport {event['transport_dtype']}", flush=True)
    elif kind == "round_start":
        print(f"round {event['round']}: sent {', '.join(event['sent_groups'])} to {event['sites']} site(s) "
              f"({event['sent_bytes_per_site'] / 1e6:.2f} MB each)", flush=True)
    elif kind == "round_end":
        m = event.get("metrics", {})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k in ("train_loss", "val_loss"))
        rejected = "; ".join(f"{s}: {r}" for s, r in event.get("rejected", [])) or "none"
        sites = ", ".join(f"{site} (n={int(m.get('num_samples', 0))}, train_loss={m.get('train_loss', float('nan')):.4g})"
                          for site, m in event.get("site_metrics", {}).items())
        eta = f", ETA {event['eta_s']:.0f} s for rounds {event['round'] + 1}..{event['rounds']}" \
            if event.get("rounds", 0) > event["round"] else ""
        print(f"round {event['round']}/{event.get('rounds', '?')} done in {event['seconds']:.1f} s{eta}: "
              f"{shown or 'no metrics'}; rejected: {rejected}\n"
              f"  sites: {sites}\n  checkpoint {event['checkpoint']}", flush=True)


def add_flower_command(backends: argparse._SubParsersAction) -> None:
    """Register ``federate flower`` and ``federate flower-app``."""

    p = backends.add_parser("flower", help="one-machine trial: real SuperLink + one SuperNode per site, TLS, flwr run",
                            **examples("fedsynth federate flower -c cfg.yaml --site site1=a_train.csv --site site2=b_train.csv,b_val.csv "
                                       "--rounds 3 -o runs/fl",
                                       "fedsynth federate flower -c cfg.yaml --site s1=a.csv --site s2=b.csv -o runs/fl   (again: resumes)"))
    p.add_argument("-c", "--config", required=True, help="experiment YAML (its federation block)")
    p.add_argument("--site", action="append", required=True, metavar="ID=TRAIN_CSV[,VAL_CSV]", help="one per site (repeat)")
    p.add_argument("--val-site", action="append", metavar="ID=VAL_CSV", help=argparse.SUPPRESS)  # deprecated alias
    p.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    p.add_argument("-o", "--output", required=True, help="run folder (certs, logs, global checkpoints); rerun to resume")
    p.add_argument("--no-tls", action="store_true", help="plain gRPC (only for debugging)")
    p.add_argument("--no-node-auth", action="store_true", help="do not require registered SuperNode keys")
    p.add_argument("--no-evaluate", action="store_true", help="skip the per-round evaluation of the global model")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up after this many seconds")
    p.add_argument("--process-per-message", action="store_true",
                   help="Flower's default isolation: a fresh ClientApp process for every message (slower; "
                        "default: one long-lived fedsynth site worker per site)")
    p.set_defaults(command="federate flower")

    p = backends.add_parser("flower-site-worker",
                            help="a site's long-lived ClientApp process, for a SuperNode started with --isolation process",
                            **examples("fedsynth federate flower-site-worker --clientappio-api-address 127.0.0.1:9094 "
                                       "--supernode-pid 4242"))

    add_arguments(p)
    p.set_defaults(command="federate flower-site-worker")

    p = backends.add_parser("flower-app", help="write the Flower app an operator runs with 'flwr run'", **examples(
        "fedsynth federate flower-app -c cfg.yaml --run-dir /srv/fl/run --superlink agg.example.org:9093 --ca ca/ca.crt -o app",
        "flwr run app fedsynth"))
    p.add_argument("-c", "--config", required=True, help="experiment YAML on the aggregator host")
    p.add_argument("--run-dir", required=True, help="where the ServerApp writes global checkpoints")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Control API (port 9093)")
    p.add_argument("--ca", default=None, help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    p.add_argument("--rounds", type=int, default=0, help="override federation.rounds (0: from the YAML)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the per-round evaluation of the global model")
    p.add_argument("-o", "--output", required=True, help="app folder to write")
    p.set_defaults(command="federate flower-app")

    p = backends.add_parser("flower-register", help="register sites' SuperNode keys and bind each key to its site's name",
                            **examples("fedsynth federate flower-register --app /srv/fedsynth/app "
                                       "--site site1=/etc/fedsynth/sites/site1.auth.pub",
                                       description="Runs 'flwr supernode register' for each key and records which site "
                                                   "the node id belongs to (RUN_DIR/server/roster.json). The ServerApp "
                                                   "names each site by its key, never by the name the site reports; a "
                                                   "node claiming another site's name is rejected."))
    p.add_argument("--app", required=True, help="the Flower app folder (fedsynth federate flower-app -o)")
    p.add_argument("--site", action="append", required=True, metavar="NAME=KEY.pub", help="one per site (repeat)")
    p.set_defaults(command="federate flower-register")

    p = backends.add_parser("flower-revoke", help="unregister a site's key; the name stays revoked in the roster",
                            **examples("fedsynth federate flower-revoke --app /srv/fedsynth/app --site site2"))
    p.add_argument("--app", required=True, help="the Flower app folder")
    p.add_argument("--site", required=True, help="the site to revoke, by its name")
    p.set_defaults(command="federate flower-revoke")

    @command("federate flower-register")
    def _register(args: argparse.Namespace) -> None:
        require("flwr", "flower", "fedsynth federate flower-register")
        from fedsynth.federated.flower.roster import register_site
        from fedsynth.federated.trial_common import parse_sites

        for site, (key, _) in parse_sites(args.site, "--site").items():
            node = register_site(args.app, site, key)
            print(f"site '{site}': key {key} registered as node {node}")

    @command("federate flower-revoke")
    def _revoke(args: argparse.Namespace) -> None:
        require("flwr", "flower", "fedsynth federate flower-revoke")
        from fedsynth.federated.flower.roster import revoke_site

        node = revoke_site(args.app, args.site)
        print(f"site '{args.site}': node {node} unregistered; its key no longer gets in")

    @command("federate flower")
    def _trial(args: argparse.Namespace) -> None:
        require("flwr", "flower", "fedsynth federate flower")
        from fedsynth.federated.flower.trial import run_trial
        from fedsynth.federated.trial_common import TrialRequest, parse_sites

        val_sites = {}
        if args.val_site:
            print("warning: --val-site is deprecated; give --site ID=TRAIN_CSV,VAL_CSV", file=sys.stderr)
            val_sites = {k: v[0] for k, v in parse_sites(args.val_site, "--val-site").items()}
        request = TrialRequest(args.config, parse_sites(args.site), Path(args.output).resolve(), args.rounds,
                               val_sites, tls=not args.no_tls,
                               node_auth=not args.no_node_auth, evaluate=not args.no_evaluate, timeout_s=args.timeout,
                               long_lived_sites=not args.process_per_message)
        done = run_trial(request, _print_event)
        print(f"federation finished at round {done.round}; global model: {done.checkpoint}\n"
              f"try: fedsynth generate --checkpoint {done.checkpoint} -o {Path(args.output) / 'samples'}")

    @command("federate flower-site-worker")
    def _worker(args: argparse.Namespace) -> None:
        require("flwr", "flower", "fedsynth federate flower-site-worker")

        run_from_args(args)

    @command("federate flower-app")
    def _app(args: argparse.Namespace) -> None:
        require("flwr", "flower", "fedsynth federate flower-app")
        from fedsynth.config import load_config

        if not args.insecure and not args.ca:
            raise ConfigError("give --ca ca.crt (the CA of the SuperLink's certificate), or --insecure for a test")
        load_config(args.config)  # fail now, not on the aggregator at run time
        app = write_app(args.output, AppSpec(Path(args.config).resolve(), Path(args.run_dir).resolve(), args.superlink,
                                             None if args.insecure else Path(args.ca), args.rounds, not args.no_evaluate))
        print(f"wrote Flower app {app}\nrun it with: flwr run {app} {FEDERATION}")
