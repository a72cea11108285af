"""OpenFL federation overhead, measured side by side in one run (not a test).

Wall time of a real 2-site, 3-round OpenFL federation (``fedsynth federate openfl``: fx PKI,
aggregator bound to 127.0.0.1, two ``fx collaborator start`` processes, mTLS) vs the *same local
compute* run sequentially in this process (the same ``Site.train_round`` calls and the same FedAvg
through ``GlobalModel``, shared with ``federation_overhead.py``), i.e. what OpenFL's processes,
certificates, TLS and polling add. With ``--with-flower`` the Flower federation of
``federation_overhead.py`` runs in the same process too, so both ratios share one baseline.

The OpenFL run also validates the aggregated and the locally tuned model on each site every round
(its standard tasks); the sequential baseline does not.

Run:  python benchmarks/openfl_overhead.py [--quick] [--with-flower] [--keep DIR]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from federation_overhead import _config, _sequential, bench_parser, two_sites  # noqa: E402  (same config and baseline as Flower's)


def main() -> int:
    parser = bench_parser(__doc__, "tiny networks, 2 local steps (a few minutes)")
    parser.add_argument("--with-flower", action="store_true", help="also run the Flower federation, same baseline")
    args = parser.parse_args()

    from fedsynth.federated.openfl.trial import run_trial

    work, sites = two_sites(args.keep, "fedsynth-bench-openfl-")
    try:
        config = _config(args.quick)

        t0 = time.perf_counter()
        from fedsynth.federated.trial_common import TrialRequest

        trial = run_trial(TrialRequest(_config(args.quick), sites, work / "openfl", timeout_s=3600))
        openfl_s = time.perf_counter() - t0

        seq_s = _sequential(_config(args.quick), sites, work / "sequential")

        flower_s = None
        if args.with_flower:
            from fedsynth.config import save_config
            from fedsynth.federated.flower.trial import LocalFederation, TrialRequest

            save_config(_config(args.quick), work / "cfg.yaml")
            t0 = time.perf_counter()
            LocalFederation(TrialRequest(work / "cfg.yaml", sites, work / "flower", evaluate=False, timeout_s=3600)).run()
            flower_s = time.perf_counter() - t0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    fed = config.federation
    print(f"OpenFL federation overhead ({'quick' if args.quick else 'full'}: GAN 32x32, 2 sites x 24 MRI slices, "
          f"{fed.rounds} rounds x {fed.local_steps} local steps, mTLS on 127.0.0.1, {os.cpu_count()} CPUs)")
    print(f"  OpenFL end to end (workspace + fx PKI + rounds + export): {openfl_s:8.1f} s")
    print(f"    of which fx workspace/PKI/plan initialize:              {trial.timings['setup_s']:8.1f} s")
    print(f"    of which aggregator + collaborators, start to stop:     {trial.timings['federation_s']:8.1f} s")
    print(f"  same local compute, sequential, in-process:               {seq_s:8.1f} s")
    print(f"  OpenFL overhead ratio end to end:            {openfl_s / seq_s:6.2f}x")
    print(f"  OpenFL overhead ratio processes (no PKI):    {trial.timings['federation_s'] / seq_s:6.2f}x")
    if flower_s is not None:
        print(f"  Flower end to end (same run, same baseline): {flower_s:8.1f} s")
        print(f"  Flower overhead ratio end to end:            {flower_s / seq_s:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
