"""The ``fedsynth audit`` sub-command: a membership-inference audit of a released model.

Only argparse here: torch loads inside the handler, so ``fedsynth --help`` stays light.
"""

from __future__ import annotations

import argparse

from fedsynth.commands import command, examples
from fedsynth.errors import FedsynthError
from fedsynth.io import check_new_file


@command("audit")
def _audit(args: argparse.Namespace) -> None:
    from fedsynth.metrics.audit import AuditOptions, audit, summary_text
    from fedsynth.metrics.evaluate import write_report

    if args.samples < 0:
        raise FedsynthError(f"--samples must be >= 0 (0: no nearest-sample attack), got {args.samples}")
    if args.noise_draws < 1:
        raise FedsynthError(f"--noise-draws must be >= 1, got {args.noise_draws}")
    if args.bootstrap < 0:
        raise FedsynthError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if bad := [t for t in args.timesteps if not 0 <= t <= 1]:
        raise FedsynthError(f"--timesteps are fractions of the diffusion's training timesteps in [0, 1], got {bad}")
    if args.output:
        check_new_file(args.output, overwrite=args.overwrite)
    options = AuditOptions(samples=args.samples, timesteps=tuple(args.timesteps), noise_draws=args.noise_draws,
                           sampler=args.sampler, steps=args.steps, bootstrap=args.bootstrap, seed=args.seed)
    report = audit(args.checkpoint, args.members, args.non_members, options, weights=args.weights)
    print(summary_text(report))
    if args.output:
        write_report(report, args.output)
        print(f"wrote {args.output}")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fedsynth audit``."""
    p = subparsers.add_parser(
        "audit", help="membership-inference audit of a checkpoint: attack AUC, TPR at low FPR, empirical epsilon",
        **examples("fedsynth audit --checkpoint runs/ddpm/best.ckpt --members data/train.csv "
                   "--non-members data/held_out.csv -o audit.json",
                   description="Attack a trained model as a privacy reviewer would: tell its training images "
                               "(--members) from images it never saw (--non-members, same distribution) by the "
                               "family's own score and by the distance to generated samples. Reports AUC and TPR "
                               "at 1 % / 0.1 % FPR with bootstrap intervals, and the epsilon lower bound the "
                               "attacks imply next to the accountant's (docs/privacy.md)."))
    p.add_argument("--checkpoint", required=True, help="the model under audit")
    p.add_argument("--members", required=True, help="CSV of images the model was trained on")
    p.add_argument("--non-members", required=True, help="CSV of images of the same distribution it was not trained on")
    p.add_argument("-o", "--output", default=None, help="report JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--samples", type=int, default=256, help="generated samples for the nearest-sample attack (0: skip)")
    p.add_argument("--timesteps", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                   help="diffusion: timesteps of the denoising-loss attack, as fractions of num_train_timesteps "
                        "(intermediate ones: the smallest carry little membership signal)")
    p.add_argument("--noise-draws", type=int, default=4, help="diffusion: noise draws averaged per image and timestep")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="diffusion sampler for the samples")
    p.add_argument("--steps", type=int, default=None, help="diffusion sampling steps for the samples")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="which weights to attack (ema: as released)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for the 95 %% intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws, the samples and the bootstrap")
