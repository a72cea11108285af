"""``python -m fedsynth.federated.openfl COMMAND`` (run inside an OpenFL workspace).

  aggregator --bind ADDRESS     start the aggregator listening on ADDRESS only
  export [--which last|best] -o FILE   aggregated model -> fedsynth checkpoint
  pin-config                    pin plan/fedsynth.yaml (sha256, rounds) in plan/plan.yaml
  revoke NAME                   remove collaborator NAME from plan/cols.yaml (a running aggregator refuses it at once)
"""

from __future__ import annotations

import argparse
import sys

from fedsynth.errors import FedsynthError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsynth.federated.openfl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("aggregator", help="fx aggregator start, bound to one address")
    p.add_argument("--bind", required=True, help="address to listen on, e.g. 127.0.0.1 or this host's interface")
    p.add_argument("-p", "--plan", default="plan/plan.yaml")
    p.add_argument("-c", "--authorized-cols", default="plan/cols.yaml")
    p = sub.add_parser("export", help="write the final (last) or best aggregated model as a fedsynth checkpoint")
    p.add_argument("--which", choices=["last", "best"], default="last")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-p", "--plan", default="plan/plan.yaml")
    p = sub.add_parser("pin-config", help="pin plan/fedsynth.yaml in plan/plan.yaml")
    p.add_argument("-p", "--plan", default="plan/plan.yaml")
    p = sub.add_parser("revoke", help="remove a collaborator from plan/cols.yaml; the running aggregator refuses it from then on")
    p.add_argument("name", help="the collaborator's name (its certificate's CN)")
    p.add_argument("-c", "--authorized-cols", default="plan/cols.yaml")
    args = parser.parse_args(argv)
    from fedsynth.federated.openfl import tools

    try:
        if args.command == "aggregator":
            tools.start_aggregator(args.bind, args.plan, args.authorized_cols)
        elif args.command == "revoke":
            left = tools.revoke_collaborator(args.name, args.authorized_cols)
            print(f"revoked '{args.name}': {args.authorized_cols} now lists {left}; a running aggregator refuses it "
                  "from its next request (its certificate stays valid: remove it from cols.yaml on every restart)")
        elif args.command == "export":
            print(tools.export_checkpoint(args.which, args.output, args.plan))
        else:
            print(f"pinned plan/fedsynth.yaml sha256 {tools.pin_config(args.plan)} in {args.plan}")
    except FedsynthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
