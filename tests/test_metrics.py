"""Sanity of the realism metrics on REAL brain MRI (2D slices and 3D blocks).

Reference ("real-train") = MNI152 (the ``mri2d`` fixture; in 3D 24 blocks cut the same way, as the
``mri3d`` fixture's 8 are too few for nearest neighbours and covariances). Held-out real = a different
brain in the same (skull-stripped T1) domain: Colin27 ``ch2bet`` from mricron-data, split by
subject. Each realism metric must score the held-out brain clearly better than
- Gaussian noise,
- the held-out brain blurred (sigma 1.5 px),
- another anatomy: a rhesus macaque T1 brain (INIA19 template, mricron-data),
- another modality (2D): the AAL atlas label map (mricron-data).
All are cut into slices/blocks by the same code as the fixtures (``fedsynth.demo.write_slices``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from fedsynth import demo
from fedsynth.data.manifest import write_manifest
from fedsynth.metrics import ImageSet, evaluate_sets, infer_config, load_real
from fedsynth.metrics import features as feat
from fedsynth.metrics import radiomics as rad
from fedsynth.metrics.similarity import memorization, ms_ssim_metric, pairwise_ms_ssim, reconstruction_quality

TEMPLATES = Path("/usr/share/mricron/templates")
VOLUMES = {"heldout": "ch2bet.nii.gz", "macaque": "inia19-t1-brain.nii.gz", "atlas": "aal.nii.gz"}

#: realism metrics: name -> (getter, direction, margin). "lower": unbounded, must grow by 50% (+ margin for
#: near-zero KID); "lower-bounded": in [0, 1], must grow by ``margin``; "higher": must drop by ``margin``.
REALISM = {
    "frd": (lambda r: r["radiomics"]["frd"], "lower", 0.0),
    "mean_ks_statistic": (lambda r: r["radiomics"]["mean_ks_statistic"], "lower-bounded", 0.05),
    "mean_wasserstein": (lambda r: r["radiomics"]["mean_wasserstein"], "lower", 0.0),
    "encoder_fid": (lambda r: r["encoder_fid"], "lower", 0.0),
    "kid": (lambda r: r["kid"]["mean"], "lower", 0.002),
    "precision": (lambda r: r["precision"], "higher", 0.15),
    "density": (lambda r: r["density"], "higher", 0.15),
}


def _write_volume_slices(path: Path, out: Path, spatial_dims: int, size: int, count: int) -> Path:
    """Slices/blocks of any NIfTI volume, cut exactly like the fixtures; returns the CSV."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "load_volume", lambda name: volume)
        rows = demo.write_slices(path.name.split(".")[0], out, image_size=size, count=count, spatial_dims=spatial_dims)
    csv = out / "images.csv"
    write_manifest(csv, rows)
    return csv


def _sets(fixture: dict[str, Path], tmp: Path, spatial_dims: int) -> dict[str, ImageSet]:
    if not all((TEMPLATES / v).is_file() for v in VOLUMES.values()):
        pytest.skip("mricron-data templates not installed")
    size, count = (32, 24) if spatial_dims == 2 else (16, 24)
    if spatial_dims == 3:  # the mri3d fixture has 8 blocks per brain: too few for k-NN and covariances
        fixture = demo.build_demo_dataset(tmp / "mni3d", image_size=size, count=count, spatial_dims=3, volumes=["mni152"])
    config = infer_config(fixture["mni152"])
    sets = {"train": load_real(fixture["mni152"], config)}
    names = ["heldout", "macaque"] + (["atlas"] if spatial_dims == 2 else [])
    for name in names:
        sets[name] = load_real(_write_volume_slices(TEMPLATES / VOLUMES[name], tmp / name, spatial_dims, size, count), config)
    held = sets["heldout"].images
    rng = np.random.default_rng(0)
    sets["noise"] = ImageSet(rng.random(held.shape, dtype=np.float32), [], "noise")
    blurred = np.stack([ndimage.gaussian_filter(im, sigma=[0] + [1.5] * spatial_dims) for im in held])
    axes = tuple(range(1, blurred.ndim))
    blurred = (blurred - blurred.min(axis=axes, keepdims=True)) / np.ptp(blurred, axis=axes, keepdims=True)
    sets["blurred"] = ImageSet(blurred.astype(np.float32), [], "blurred")
    return sets


@pytest.fixture(scope="module")
def reports2d(mri2d: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    sets = _sets(mri2d, tmp_path_factory.mktemp("sanity2d"), 2)
    train = sets.pop("train")
    return {name: evaluate_sets(train, s) for name, s in sets.items()}


@pytest.fixture(scope="module")
def reports3d(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    sets = _sets({}, tmp_path_factory.mktemp("sanity3d"), 3)
    train = sets.pop("train")
    return {name: evaluate_sets(train, s) for name, s in sets.items()}


def _check_sanity(reports: dict[str, dict]) -> None:
    held = reports["heldout"]
    failures = []
    for bad in [n for n in reports if n != "heldout"]:
        for metric, (get, direction, margin) in REALISM.items():
            good, worse = get(held), get(reports[bad])
            if direction == "lower":
                ok = worse > 1.5 * max(good, 0) + margin
            elif direction == "lower-bounded":
                ok = worse > good + margin
            else:
                ok = worse < good - margin
            if not ok:
                failures.append(f"{metric}: held-out {good:.4g} vs {bad} {worse:.4g}")
    assert not failures, "realism metrics that did not separate real from degraded:\n" + "\n".join(failures)


def test_realism_metrics_separate_real_from_degraded_2d(reports2d: dict[str, dict]) -> None:
    _check_sanity(reports2d)
    held = reports2d["heldout"]
    assert held["precision"] >= 0.8 and held["recall"] >= 0.8 and held["coverage"] >= 0.8
    assert held["memorization"]["near_copies"] == 0  # a different brain is no copy
    assert held["radiomics"]["backend"].startswith("pyradiomics") or "numpy" in held["radiomics"]["backend"]
    # noise has no anatomy: nothing of the real set is covered
    assert reports2d["noise"]["coverage"] <= 0.1 and reports2d["noise"]["recall"] <= 0.1


def test_realism_metrics_separate_real_from_degraded_3d(reports3d: dict[str, dict]) -> None:
    _check_sanity(reports3d)
    assert reports3d["heldout"]["real"]["shape"] == [1, 16, 16, 16]


def test_identical_sets_score_perfectly_and_are_flagged_as_copies(mri2d: dict[str, Path]) -> None:
    real = load_real(mri2d["mni152"], infer_config(mri2d["mni152"]))
    report = evaluate_sets(real, real)
    assert report["radiomics"]["frd"] < 1e-6 and report["encoder_fid"] < 1e-4
    assert report["precision"] == report["recall"] == report["coverage"] == 1.0
    assert report["memorization"]["near_copies"] == len(real)
    assert report["memorization"]["flagged"][0]["ratio"] == pytest.approx(0.0, abs=1e-6)


def test_memorization_flags_only_near_copies(mri2d: dict[str, Path]) -> None:
    config = infer_config(mri2d["mni152"])
    train, other = load_real(mri2d["mni152"], config), load_real(mri2d["colin27"], config)
    rng = np.random.default_rng(0)
    copies = np.clip(train.images[:4] + rng.normal(0, 0.005, train.images[:4].shape), 0, 1)
    synthetic = np.concatenate([copies, other.images[:8]]).astype(np.float32)
    result = memorization(train.images, synthetic, train.ids)
    flagged = sorted(f["synthetic_index"] for f in result["flagged"])
    assert flagged == [0, 1, 2, 3]
    assert all(f["nearest_training_id"] == "mni152" for f in result["flagged"])
    assert len(result["ratios"]) == 12 and min(result["ratios"][4:]) > 0.5


def test_ms_ssim_diversity_detects_mode_collapse(mri2d: dict[str, Path]) -> None:
    real = load_real(mri2d["mni152"], infer_config(mri2d["mni152"]))
    collapsed = np.repeat(real.images[10:11], 12, axis=0)
    assert pairwise_ms_ssim(collapsed)["mean"] == pytest.approx(1.0, abs=1e-6)
    diverse = pairwise_ms_ssim(real.images)
    assert 0.1 < diverse["mean"] < 0.95 and diverse["pairs"] == 24 * 23 // 2


class _Blur(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction is a ``width``-pixel box blur (1: a perfect copy)."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.width = width

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        pool = torch.nn.functional.avg_pool2d if x.ndim == 4 else torch.nn.functional.avg_pool3d
        return pool(x, self.width, stride=1, padding=self.width // 2, count_include_pad=False)


def test_monai_similarity_metrics_match_the_hand_composed_values(mri2d: dict[str, Path], mri3d: dict[str, Path]) -> None:
    """MONAI's MS-SSIM/SSIM/PSNR give the values recorded from the former hand-composed MS-SSIM
    (MONAI's per-scale SSIM terms, float64 pooling) on the same MNI152 images, for every kernel
    size and number of scales ``ssim_geometry`` picks; the gap is float32 rounding."""
    im2 = load_real(mri2d["mni152"], infer_config(mri2d["mni152"])).images
    im3 = load_real(mri3d["mni152"], infer_config(mri3d["mni152"])).images
    assert pairwise_ms_ssim(im2) == pytest.approx({"mean": 0.585111174583506, "std": 0.19109353045658997, "pairs": 276},
                                                  abs=1e-6)
    assert pairwise_ms_ssim(im3) == pytest.approx({"mean": 0.12318565776546983, "std": 0.14439381545839344, "pairs": 28},
                                                  abs=1e-6)
    recorded = {64: [0.519770522740059, 0.5187103778065537, 0.4002689491196625, 0.24667115283603014],  # kernel 7, 4 scales
                192: [0.4894100259401962, 0.4944127050341992, 0.3848442741791445, 0.19642725452034276]}  # kernel 11, 5
    for size, values in recorded.items():
        up = torch.nn.functional.interpolate(torch.from_numpy(im2), size=size, mode="bilinear").clamp(0, 1)
        assert ms_ssim_metric(2, size)(up[:4], up[4:8]).flatten().tolist() == pytest.approx(values, abs=1e-6)
    assert reconstruction_quality(_Blur(), im2) == pytest.approx(
        {"ssim": 0.7632823586463928, "psnr": 23.572830200195312, "count": 24}, abs=1e-6)
    assert reconstruction_quality(_Blur(), im3) == pytest.approx(
        {"ssim": 0.467556893825531, "psnr": 17.60015296936035, "count": 8}, abs=1e-6)
    assert reconstruction_quality(_Blur(1), im3)["psnr"] == 100.0  # capped, as the former MSE floor of 1e-10


def test_numpy_first_order_matches_pyradiomics() -> None:
    pytest.importorskip("radiomics")
    image = (np.random.default_rng(1).random((1, 32, 32)) ** 2).astype(np.float32)
    names, matrix, failed = rad.extract(image[None], 32, use_pyradiomics=True)
    ours = rad.first_order_numpy(image[0], 32)
    theirs = dict(zip(names, matrix[0], strict=False))
    assert failed == 0 and len(names) > 80  # first-order + texture classes
    for key in ("Mean", "Variance", "Entropy", "Uniformity", "90Percentile", "Skewness", "Kurtosis"):
        # pyradiomics' full mask leaves out one corner voxel, hence the tolerance
        assert ours[key] == pytest.approx(theirs[f"firstorder_{key}"], rel=0.01, abs=1e-3), key


def test_frechet_kid_prdc_on_known_gaussians() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    shifted = b + np.array([3.0, 0, 0, 0])
    assert feat.frechet_distance(a, b) < 0.1
    assert feat.frechet_distance(a, shifted) == pytest.approx(9.0, rel=0.1)
    assert abs(feat.kid(a, b)[0]) < 0.1 < 1.0 < feat.kid(a, shifted)[0]
    same, far = feat.prdc(a, b), feat.prdc(a, shifted)
    assert same["precision"] > 0.8 and same["coverage"] > 0.8
    assert far["precision"] < 0.5 and far["density"] < 0.3 and far["coverage"] < 0.4


def test_random_conv_encoder_is_fixed_and_works_in_3d() -> None:
    x = np.random.default_rng(0).random((3, 1, 16, 16, 16), dtype=np.float32)
    a = feat.embed(feat.RandomConvEncoder(3, 1), x)
    b = feat.embed(feat.RandomConvEncoder(3, 1), x)
    assert a.shape == (3, 2 * sum(feat.RANDOM_CONV_CHANNELS)) and np.array_equal(a, b) and np.isfinite(a).all()


@pytest.mark.parametrize(("spatial_dims", "conv", "features_sum"), [(2, torch.nn.Conv2d, 131.24899730901234),
                                                                   (3, torch.nn.Conv3d, 123.48784280801192)])
def test_random_conv_encoder_weights_are_unchanged(spatial_dims: int, conv: type, features_sum: float) -> None:
    """MONAI's Conv factory builds the same torch layers, and the seeded weights give the features
    recorded before it did (FRD and precision figures depend on them)."""
    encoder = feat.RandomConvEncoder(spatial_dims, 1)
    assert all(type(layer) is conv for layer in encoder.layers)
    x = np.random.default_rng(0).random((2, 1, *[16] * spatial_dims), dtype=np.float32)
    assert feat.embed(encoder, x).sum() == pytest.approx(features_sum, rel=1e-9)


def test_numpy_first_order_fallback_still_separates(mri2d: dict[str, Path], tmp_path: Path) -> None:
    """Without pyradiomics, the FRD on numpy first-order features keeps its sanity."""
    sets = _sets(mri2d, tmp_path, 2)
    _, train, _ = rad.extract(sets["train"].images, 32, use_pyradiomics=False)
    scores = {name: rad.frd(train, rad.extract(sets[name].images, 32, use_pyradiomics=False)[1])[0]
              for name in ("heldout", "noise", "blurred", "macaque", "atlas")}
    for bad in ("noise", "blurred", "macaque", "atlas"):
        assert scores[bad] > 1.5 * scores["heldout"], scores
