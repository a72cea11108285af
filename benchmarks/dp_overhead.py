"""DP step time / non-DP step time per model family, on real MRI slices, measured in one run.

Each family is built twice from the same config (once plain, once with ``privacy.enabled``,
wrapped exactly as the engine does), and both train on the same fixed real batches; timings
alternate plain/DP step by step so machine load affects both alike. Printed figures are
ratios (and the per-step medians they come from).

    python benchmarks/dp_overhead.py            # 2D 64x64, batch 16, 20 timed steps
    python benchmarks/dp_overhead.py --quick    # 2D 32x32, batch 8, 5 timed steps
    python benchmarks/dp_overhead.py --dims 3   # 3D 32^3, batch 4 (hooks vs functorch)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, dict[str, Any]] = {
    "gan": {"family": "gan", "latent_dim": 64, "generator_channels": 64, "discriminator_channels": 32},
    "autoencoder-kl": {"family": "autoencoder", "channels": [16, 32], "latent_channels": 3},
    "autoencoder-kl-attn": {"family": "autoencoder", "channels": [16, 32], "latent_channels": 3, "attention": True},
    "autoencoder-vqvae": {"family": "autoencoder", "architecture": "vqvae", "channels": [16, 32], "latent_channels": 3},
    "diffusion": {"family": "diffusion", "channels": [16, 32], "num_head_channels": 16, "num_train_timesteps": 1000},
}


def _config(model: dict[str, Any], dims: int, size: int, batch: int, privacy: dict[str, Any] | None):
    from fedsynth.config import config_from_dict

    data = {"spatial_dims": dims, "image_size": size, "seed": 0, "model": dict(model),
            "training": {"batch_size": batch, "progress": False, "tensorboard": False}}
    if privacy:
        data["privacy"] = privacy
    return config_from_dict(data, "benchmark")


def _setup(cfg, csv: Path):
    from fedsynth.data.dataset import load_datasets
    from fedsynth.engine import build_engine

    train, _ = load_datasets(cfg, str(csv))
    engine = build_engine(cfg, None)
    engine.loader(train, train=True)  # make_private when DP is on
    return engine, train


def _batches(train, batch: int, count: int):
    from fedsynth.data.dataset import make_loader

    loader = make_loader(train, batch, shuffle=True, seed=0)
    out = []
    while len(out) < count:
        out.extend(b for b in loader if len(b) == batch)
    return out[:count]


def _step_time(engine, batch) -> float:
    start = time.perf_counter()
    engine.train_step(batch)
    return time.perf_counter() - start


def measure(name: str, model: dict[str, Any], csv: Path, dims: int, size: int, batch: int, steps: int,
            mode: str) -> dict[str, float]:
    privacy = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "grad_sample_mode": mode}
    plain, train = _setup(_config(model, dims, size, batch, None), csv)
    private, _ = _setup(_config(model, dims, size, batch, privacy), csv)
    batches = _batches(train, batch, steps + 2)
    for b in batches[:2]:  # warm-up
        _step_time(plain, b), _step_time(private, b)
    t_plain, t_dp = [], []
    for b in batches[2:]:
        t_plain.append(_step_time(plain, b))
        t_dp.append(_step_time(private, b))
    p, d = statistics.median(t_plain), statistics.median(t_dp)
    return {"plain_s": p, "dp_s": d, "ratio": d / p}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, few steps (CI smoke)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--modes", nargs="*", default=None, choices=("hooks", "functorch"),
                        help="per-sample gradient modes (default: hooks in 2D, both in 3D)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedsynth.demo import build_demo_dataset

    if args.dims == 2:
        size, batch, steps = (32, 8, 5) if args.quick else (64, 16, 20)
    else:
        size, batch, steps = (16, 2, 3) if args.quick else (32, 4, 8)
    modes = args.modes or (["hooks"] if args.dims == 2 else ["hooks", "functorch"])
    with tempfile.TemporaryDirectory() as tmp:
        csv = build_demo_dataset(Path(tmp), image_size=size, count=max(4 * batch, 24), spatial_dims=args.dims)["mni152"]
        print(f"DP overhead, {args.dims}D {size}^{args.dims}, batch {batch}, median of {steps} steps, "
              f"torch threads {torch.get_num_threads()}, real MNI152 slices")
        print(f"{'family':<22}{'mode':<11}{'plain s/step':>14}{'DP s/step':>12}{'DP/plain':>10}")
        for name in args.families:
            for mode in modes:
                r = measure(name, FAMILIES[name], csv, args.dims, size, batch, steps, mode)
                print(f"{name:<22}{mode:<11}{r['plain_s']:>14.4f}{r['dp_s']:>12.4f}{r['ratio']:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
