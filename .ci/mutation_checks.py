"""Break the code on purpose and check that the tests guarding it fail (issue 12: "tests that can fail").

Each mutation edits one line of a clean copy of HEAD (a detached git worktree in a temporary folder),
runs the tests that guard that behaviour against the copy, and expects them to FAIL. The unmutated
copy is run first: the same tests must PASS there. Writes a Markdown table (docs/mutation-checks.md).

    python .ci/mutation_checks.py                 # every mutation (about 20 minutes on 2 cores)
    python .ci/mutation_checks.py --only nan_check ddp_rank_rng
    python .ci/mutation_checks.py --list

Not part of `.ci/run` (too slow for every commit); run it after changing a guarded behaviour.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, in words
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("set_weights_noop", "`set_weights` validates keys and shapes but loads nothing", "fedsynth/models/base.py",
             "            module.load_state_dict(incoming, strict=False)\n", "            pass\n",
             ("tests/test_models.py::test_get_set_round_trip",)),
    Mutation("disc_loss_couples_rows", "the discriminator loss subtracts the batch mean of the real logits "
             "(per-sample gradients no longer per sample)", "fedsynth/models/losses.py",
             "    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()",
             "    return F.softplus(-(real_logits - real_logits.mean())).mean() + F.softplus(fake_logits).mean()",
             ("tests/test_privacy_grads.py::test_gan_discriminator_per_sample_grads_fold_real_and_fake",)),
    Mutation("ddp_every_rank_writes", "every DDP rank writes checkpoints and logs, not only rank 0", "fedsynth/engine.py",
             "        return self.dist.is_main and self.run_dir is not None",
             "        return self.run_dir is not None",
             ("tests/test_engine.py::test_ddp_ranks_end_identical_and_only_rank0_writes",)),
    Mutation("ddp_no_buffer_sync", "DDP ranks do not share rank 0's buffers after an epoch", "fedsynth/engine.py",
             "                torch_dist.broadcast(buffer.data, src=0)", "                pass",
             ("tests/test_engine.py::test_ddp_ranks_end_identical_and_only_rank0_writes",)),
    Mutation("ddp_rank_rng", "a DDP checkpoint keeps only rank 0's RNG (resume re-seeds the others)", "fedsynth/engine.py",
             "            if ranks is not None and len(ranks) == self.dist.world_size:",
             "            if False:",
             ("tests/test_engine.py::test_ddp_resume_mid_epoch_equals_uninterrupted",)),
    Mutation("resume_skips_rng", "a mid-epoch resume does not restore the RNG states saved after that step",
             "fedsynth/engine.py", "            restore_rng(self._pending_rng)\n            if state.data_rng is not None:",
             "            if state.data_rng is not None:",
             ("tests/test_resume.py::test_interrupted_and_resumed_equals_uninterrupted[gan-2d-mid_epoch]",)),
    Mutation("resume_counts_partial_epoch", "a run stopped mid-epoch is resumed as if the epoch were complete",
             "fedsynth/engine.py", "        for _ in range(state.batch_in_epoch):\n            next(batches, None)",
             "        state.batch_in_epoch = 0",
             ("tests/test_resume.py::test_interrupted_and_resumed_equals_uninterrupted[diffusion-2d-mid_epoch]",)),
    Mutation("nan_check", "NaN/Inf voxels are not refused", "fedsynth/data/images.py",
             "    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():\n        n_nan",
             "    if False:\n        n_nan",
             ("tests/test_bad_inputs.py::test_bad_input_is_one_clear_error[nan_voxel]",)),
    Mutation("nifti_unchecked", "NIfTI files are read by SimpleITK alone (it zero-fills truncated files)",
             "fedsynth/data/images.py", "        check_nifti(path)\n    try:", "        pass\n    try:",
             ("tests/test_bad_inputs.py::test_bad_input_is_one_clear_error[truncated_nii]",)),
    Mutation("nan_update_accepted", "a site update with NaN is averaged in", "fedsynth/federated/aggregation.py",
             "    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():\n        raise UpdateRejected",
             "    if False:\n        raise UpdateRejected",
             ("tests/test_aggregation.py::test_bad_updates_are_rejected_and_round_goes_on",)),
    Mutation("site_floor_ignored", "a site accepts a coordinator config that turns its DP off",
             "fedsynth/federated/site_config.py", "        if dp_needed and not p.enabled:", "        if False:",
             ("tests/test_site_policy.py::test_a_weaker_coordinator_config_is_refused_naming_field_and_values",)),
    Mutation("diverged_state_saved", "the engine checkpoints non-finite weights (a diverged site stays poisoned)",
             "fedsynth/engine.py", "                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):",
             "                if False:", ("tests/test_site_faults.py",)),
    Mutation("nan_metric_counted", "a site's NaN validation loss keeps its samples in the mean's denominator",
             "fedsynth/federated/aggregation.py",
             "            if k == \"num_samples\" or v is None or not math.isfinite(float(v)) or n <= 0:\n                continue",
             "            if k == \"num_samples\" or v is None or n <= 0:\n                continue\n            if not math.isfinite(float(v)):\n                weight[k] = weight.get(k, 0.0) + n\n                continue",
             ("tests/test_aggregation.py::test_metric_means_count_only_sites_that_reported_a_finite_value",)),
    Mutation("prompt_ignored", "the UNet never sees the prompt (text context dropped)", "fedsynth/models/diffusion.py",
             "        pred = unet(x_t, timesteps=t, context=context, class_labels=class_labels)",
             "        pred = unet(x_t, timesteps=t, context=torch.zeros_like(context) if context is not None else None, "
             "class_labels=class_labels)",
             ("tests/test_text.py::test_prompts_are_learned_held_out",)),
    Mutation("benchmark_section_skipped", "the quality benchmark writes only a 'skipped' line", "benchmarks/run.py",
             "            lines, shared[\"encoder\"] = q.bench_quality(work, budget, quality_data(), grids)\n            return lines",
             "            return [\"## Quality: each family with its recipe, on held-out real slices\", \"\", \"- skipped\", \"\"]",
             ("tests/test_benchmarks.py::test_benchmark_suite_quick",)),
]


def run_tests(tree: Path, tests: tuple[str, ...], env_extra: dict[str, str] | None = None,
              timeout: int = 1800) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               FLWR_TELEMETRY_ENABLED="0", **(env_extra or {}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=timeout)
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
    return proc.returncode, tail[0], time.perf_counter() - t0


def worktree(tmp: Path, name: str) -> Path:
    path = tmp / name
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), "HEAD"], cwd=ROOT, check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutation names")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "mutation-checks.md"))
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what} -> {', '.join(m.tests)}")
        return 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="fedsynth-mutants-") as tmp_name:
        tmp = Path(tmp_name)
        clean = worktree(tmp, "clean")
        try:
            for m in chosen:
                base_rc, base_tail, base_s = run_tests(clean, m.tests)
                mutant = worktree(tmp, m.name)
                try:
                    target = mutant / m.path
                    text = target.read_text(encoding="utf-8")
                    if text.count(m.old) != 1:
                        raise SystemExit(f"{m.name}: the line to mutate is not found exactly once in {m.path}")
                    target.write_text(text.replace(m.old, m.new), encoding="utf-8")
                    rc, tail, seconds = run_tests(mutant, m.tests)
                finally:
                    subprocess.run(["git", "worktree", "remove", "--force", str(mutant)], cwd=ROOT, check=False)
                caught = base_rc == 0 and rc != 0
                ok &= caught
                rows.append(f"| `{m.name}` | {m.what} | `{m.path}` | {', '.join(f'`{t}`' for t in m.tests)} | "
                            f"{'pass' if base_rc == 0 else 'FAIL'} ({base_s:.0f} s) | "
                            f"{'fail' if rc != 0 else 'PASS'}: {tail} | {'caught' if caught else '**not caught**'} |")
                print(rows[-1], flush=True)
            # missing optional data: the Colin27 tests skip with a reason instead of failing
            rc, tail, seconds = run_tests(clean, ("tests/test_metrics.py::test_memorization_flags_only_near_copies", "-rs"), {"FEDSYNTH_TEST_NO_COLIN27": "1"})
            skipped = rc == 0 and "skipped" in tail
            ok &= skipped
            rows.append(f"| `no_colin27` | mricron-data absent (`FEDSYNTH_TEST_NO_COLIN27=1`) | — | `tests/test_metrics.py::test_memorization_flags_only_near_copies` | — | "
                        f"{tail} | {'skips with a reason' if skipped else '**fails**'} |")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(clean)], cwd=ROOT, check=False)
    lines = ["# Mutation checks: the tests fail when the code is wrong", "",
             f"`python .ci/mutation_checks.py` on commit `{head}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "Each row breaks one line of a clean copy of the tree, runs the tests guarding that behaviour and expects "
             "them to fail; the same tests must pass on the unmutated copy first.", "",
             "| mutation | the bug | file | tests | unmutated | mutated | verdict |", "|---|---|---|---|---|---|---|", *rows, ""]
    Path(args.output).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
