"""Flower federation overhead, measured side by side in one run (not a test).

1. Wall time of a real 2-site, 3-round Flower federation (SuperLink + 2 SuperNodes + ``flwr
   run`` on 127.0.0.1 with TLS and SuperNode auth) vs the *same local compute* run
   sequentially in this process (the same ``Site.train_round`` calls and the same FedAvg
   through ``GlobalModel``), i.e. what Flower's processes, TLS and polling add.
2. Bytes per round per site (site -> server payload, what ``server/received.jsonl`` records)
   for float32 vs float16 transport and a shared vs local GAN discriminator: measured on the
   wire format the apps use (``records.encode``), cross-checked against the federation's log.

Run:  python benchmarks/federation_overhead.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _config(quick: bool, **federation: object):  # type: ignore[no-untyped-def]
    from fedsynth.config import config_from_dict

    model = ({"family": "gan", "latent_dim": 16, "generator_channels": 32, "discriminator_channels": 16} if quick
             else {"family": "gan"})
    return config_from_dict({
        "spatial_dims": 2, "image_size": 32, "seed": 0, "model": model,
        "training": {"batch_size": 8, "progress": False, "tensorboard": False, "sample_every": 1000},
        "federation": {"rounds": 3, "local_steps": 2 if quick else 10, "min_sites": 2, **federation},
    }, "benchmark")


def _sequential(config, sites: dict[str, Path], out: Path) -> float:  # type: ignore[no-untyped-def]
    """The federation's compute without Flower: same Site rounds, same FedAvg, one process."""
    from fedsynth.federated.aggregation import SiteUpdate
    from fedsynth.federated.server import GlobalModel
    from fedsynth.federated.site import Site

    t0 = time.perf_counter()
    gm = GlobalModel(config, out)
    for server_round in range(1, config.federation.rounds + 1):
        updates = []
        for site_id, csv in sites.items():
            site = Site(config, csv, out / "sites" / site_id, site_id=site_id)  # fresh, state from disk (as Flower)
            result = site.train_round(gm.shared_weights(), server_round)
            updates.append(SiteUpdate(site_id, result.weights, result.num_samples, result.metrics))
        gm.aggregate(server_round, updates)
        gm.save()
    return time.perf_counter() - t0


def _bytes_per_site(config) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Site -> server payload per round for fp32/fp16 x shared/local discriminator."""
    from fedsynth.federated.aggregation import resolve_group_policy, select_groups, shared_groups
    from fedsynth.federated.flower.records import encode, record_nbytes
    from fedsynth.models import build_model

    model = build_model(config)
    out: dict[str, int] = {}
    for d_policy in ("shared", "local"):
        config.federation.groups = {"discriminator": d_policy}
        groups = shared_groups(resolve_group_policy(model, config.federation))
        weights = select_groups(model.get_weights(), groups)
        for dtype in ("float32", "float16"):
            out[f"{dtype}/D {d_policy}"] = record_nbytes(encode(weights, dtype))
    config.federation.groups = {}
    return out


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The overhead benchmarks' common options: ``--quick`` and ``--keep DIR``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--keep", default=None, help="keep the run folders here")
    return parser


def two_sites(keep: str | None, prefix: str) -> tuple[Path, dict[str, Path]]:
    """A work folder (``keep`` or a new temporary one) holding two real-MRI sites (24 axial slices
    per brain at 32x32: MNI152 and Colin27), and their CSVs by site name."""
    from fedsynth.demo import build_demo_dataset

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    data = build_demo_dataset(work / "data", image_size=32, count=24, spatial_dims=2)
    return work, {"site1": Path(data["mni152"]), "site2": Path(data["colin27"])}


def main() -> int:
    args = bench_parser(__doc__, "tiny networks, 2 local steps (a minute or two)").parse_args()

    from fedsynth.config import save_config
    from fedsynth.federated.flower.trial import LocalFederation, TrialRequest

    work, sites = two_sites(args.keep, "fedsynth-bench-")
    try:
        config = _config(args.quick)
        save_config(config, work / "cfg.yaml")

        t0 = time.perf_counter()
        done = LocalFederation(TrialRequest(work / "cfg.yaml", sites, work / "flower", evaluate=False,
                                            timeout_s=3600)).run()
        flower_s = time.perf_counter() - t0
        events = [json.loads(x) for x in (work / "flower" / "server" / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
        rounds_s = sum(e["seconds"] for e in events if e["event"] == "round_end")
        received = [json.loads(x) for x in (work / "flower" / "server" / "received.jsonl").read_text(encoding="utf-8").splitlines()]

        seq_s = _sequential(_config(args.quick), sites, work / "sequential")
        sizes = _bytes_per_site(_config(args.quick))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    measured = sorted({r["bytes"] for r in received if "bytes" in r})
    print(f"Flower federation overhead ({'quick' if args.quick else 'full'}: GAN 32x32, 2 sites x 24 MRI slices, "
          f"{config.federation.rounds} rounds x {config.federation.local_steps} local steps, TLS + node auth, "
          f"{os.cpu_count()} CPUs)")
    print(f"  real federation, end to end (start-up + rounds + stop): {flower_s:8.1f} s   (finished round {done['round']})")
    print(f"  real federation, rounds only (server's round timers):   {rounds_s:8.1f} s")
    print(f"  same local compute, sequential, in-process:             {seq_s:8.1f} s")
    print(f"  overhead ratio end to end:    {flower_s / seq_s:6.2f}x")
    print(f"  overhead ratio rounds only:   {rounds_s / seq_s:6.2f}x")
    print("bytes per round per site (site -> server; the server sends the same groups back):")
    base = sizes["float32/D shared"]
    for key, value in sizes.items():
        print(f"  {key:18s} {value:>12,d} B   {value / base:5.2f} of float32/D shared")
    print(f"  measured in the federation's received.jsonl (float32/D shared): {measured} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
