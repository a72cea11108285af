"""Federation overhead at realistic round lengths, both backends, measured in one run (not a test).

2 sites (MNI152 and Colin27 slices, one brain each), 5 rounds, a full-size GAN at 32x32 with
``local_epochs`` calibrated so one site's round is >= ``--round-seconds`` (default 10 s) of local
compute. Four runs on the same config and data:

- **baseline**: the same ``Site.train_round`` calls and the same FedAvg (``GlobalModel``) in this
  process, each site's ``Site`` built once and kept in memory, one thread per site (what each site
  gets in the federations on this machine). It gives every (round, site) compute time ``t``:
  *sequential compute* = sum over rounds and sites, *parallel critical path* = sum over rounds of
  the slowest site (what two sites training at the same time need at best);
- **Flower** with its default long-lived site workers (SuperNode ``--isolation process`` + one
  ``fedsynth federate flower-site-worker`` per site), TLS + SuperNode authentication;
- **Flower, a process per message** (Flower's own default isolation);
- **OpenFL** (``fedsynth federate openfl``: fx PKI, mTLS, aggregator + 2 collaborators, the
  ``RoundTimeoutPolicy`` straggler policy and the 1 s idle poll).

Reported: wall time end to end (start-up, certificates, rounds, stop) and the steady-state rounds
2-5 (between the global checkpoints of rounds 1 and 5), each as a ratio to the sequential compute
(the issue's measure) and to the parallel critical path (what the framework adds on top of the
parallel compute).

Run:  python benchmarks/round_overhead.py [--round-seconds 10] [--rounds 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SLICES = 96  # per site (brain): 12 batches of 8 per epoch


def _config(rounds: int, local_epochs: int):  # type: ignore[no-untyped-def]
    from fedsynth.config import config_from_dict

    return config_from_dict({
        "spatial_dims": 2, "image_size": 32, "seed": 0, "model": {"family": "gan"},
        "training": {"batch_size": 8, "progress": False, "tensorboard": False, "sample_every": 10**6},
        "federation": {"rounds": rounds, "local_epochs": local_epochs, "min_sites": 2, "round_timeout_s": 600.0},
    }, "benchmark")


def _calibrate(sites: dict[str, Path], out: Path, round_seconds: float) -> tuple[int, float]:
    """Local epochs that make one site's round last ``round_seconds`` (one thread, as in the federations)."""
    from fedsynth.federated.server import GlobalModel
    from fedsynth.federated.site import Site

    probe = 2
    config = _config(2, probe)
    gm = GlobalModel(config, out)
    site = Site(config, next(iter(sites.values())), out / "site", site_id="probe")
    site.train_round(gm.shared_weights(), 1)  # warm-up: first batch, allocations
    t0 = time.perf_counter()
    site.train_round(gm.shared_weights(), 2)
    per_epoch = (time.perf_counter() - t0) / probe
    return max(1, math.ceil(round_seconds / per_epoch)), per_epoch


def _baseline(config, sites: dict[str, Path], out: Path) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Same rounds without a framework: Sites in memory, compute timed per (round, site)."""
    from fedsynth.federated.aggregation import SiteUpdate
    from fedsynth.federated.server import GlobalModel
    from fedsynth.federated.site import Site

    gm = GlobalModel(config, out)
    live = {s: Site(config, csv, out / "sites" / s, site_id=s) for s, csv in sites.items()}
    times: list[dict[str, float]] = []
    for server_round in range(1, config.federation.rounds + 1):
        updates, row = [], {}
        for site_id, site in live.items():
            t0 = time.perf_counter()
            result = site.train_round(gm.shared_weights(), server_round)
            row[site_id] = time.perf_counter() - t0
            updates.append(SiteUpdate(site_id, result.weights, result.num_samples, result.metrics))
        gm.aggregate(server_round, updates)
        gm.save()
        times.append(row)
    return {"per_round": times,
            "sequential_s": sum(sum(r.values()) for r in times),
            "critical_s": sum(max(r.values()) for r in times),
            "sequential_2_5_s": sum(sum(r.values()) for r in times[1:]),
            "critical_2_5_s": sum(max(r.values()) for r in times[1:])}


def _steady_rounds_s(global_dir: Path, rounds: int) -> float:
    """Seconds between the global checkpoints of round 1 and round ``rounds`` (rounds 2..N)."""
    return (global_dir / f"round_{rounds:04d}.ckpt").stat().st_mtime - (global_dir / "round_0001.ckpt").stat().st_mtime


def _flower(config_path: Path, sites: dict[str, Path], run: Path, long_lived: bool, rounds: int) -> dict[str, float]:
    from fedsynth.federated.flower.trial import run_trial
    from fedsynth.federated.trial_common import TrialRequest

    t0 = time.perf_counter()
    run_trial(TrialRequest(config_path, sites, run, evaluate=False, timeout_s=3600, long_lived_sites=long_lived))
    return {"end_to_end_s": time.perf_counter() - t0, "rounds_2_5_s": _steady_rounds_s(run / "global", rounds)}


def _openfl(config_path: Path, sites: dict[str, Path], run: Path, rounds: int) -> dict[str, float]:
    from fedsynth.federated.openfl.trial import run_trial
    from fedsynth.federated.trial_common import TrialRequest

    t0 = time.perf_counter()
    run_trial(TrialRequest(config_path, sites, run, timeout_s=3600))
    return {"end_to_end_s": time.perf_counter() - t0, "rounds_2_5_s": _steady_rounds_s(run / "global", rounds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-seconds", type=float, default=10.0, help="local compute of one site's round (default 10)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", default=None, help="keep the run folders here")
    args = parser.parse_args()

    import torch

    from fedsynth.config import save_config
    from fedsynth.demo import build_demo_dataset
    from fedsynth.federated.trial_common import threads_per_site

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedsynth-bench-rounds-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = build_demo_dataset(work / "data", image_size=32, count=SLICES, spatial_dims=2)
        sites = {"site1": Path(data["mni152"]), "site2": Path(data["colin27"])}
        threads = int(threads_per_site(len(sites)))
        torch.set_num_threads(threads)
        local_epochs, per_epoch = _calibrate(sites, work / "calibrate", args.round_seconds)
        config = _config(args.rounds, local_epochs)
        save_config(config, work / "cfg.yaml")
        base = _baseline(config, sites, work / "baseline")
        runs = {
            "Flower, long-lived site workers": _flower(work / "cfg.yaml", sites, work / "flower", True, args.rounds),
            "Flower, a process per message": _flower(work / "cfg.yaml", sites, work / "flower-ppm", False, args.rounds),
            "OpenFL": _openfl(work / "cfg.yaml", sites, work / "openfl", args.rounds),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    seq, crit = float(base["sequential_s"]), float(base["critical_s"])  # type: ignore[arg-type]
    seq25, crit25 = float(base["sequential_2_5_s"]), float(base["critical_2_5_s"])  # type: ignore[arg-type]
    per_round = base["per_round"]
    print(f"Federation overhead at realistic rounds: GAN 32x32 (full size), 2 sites x {SLICES} MRI slices, {args.rounds} rounds x "
          f"{local_epochs} local epochs ({per_epoch:.2f} s/epoch calibrated), {threads} thread(s) per site, {os.cpu_count()} CPUs")
    print("baseline (no framework, Sites in memory), local compute per round and site [s]: "
          + "; ".join(", ".join(f"{s} {t:.1f}" for s, t in r.items()) for r in per_round))  # type: ignore[union-attr]
    print(f"  sequential compute {seq:.1f} s (rounds 2-{args.rounds}: {seq25:.1f} s); "
          f"parallel critical path {crit:.1f} s (rounds 2-{args.rounds}: {crit25:.1f} s)")
    print(f"| run | end to end [s] | / sequential | / critical path | rounds 2-{args.rounds} [s] | / sequential | / critical path |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        e2e, steady = r["end_to_end_s"], r["rounds_2_5_s"]
        print(f"| {name} | {e2e:.1f} | {e2e / seq:.2f} | {e2e / crit:.2f} | {steady:.1f} | {steady / seq25:.2f} | {steady / crit25:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
