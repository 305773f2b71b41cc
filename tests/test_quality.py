"""Quality metrics (optimizer/compile/quality.py) and the bundled demo teacher and digit classifier."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import numpy as np
import pytest

from optimizer.compile import quality
from optimizer.compile.quality import (
    RandomProjectionExtractor,
    fid,
    frechet_distance,
    load_digits_feature_extractor,
    paired_psnr,
)

TEACHER_DIR = quality.DIGITS_CLASSIFIER_PATH.parent / "teacher"
# FID of 64 DDIM-64 samples (noise seeds 0..63) vs all 1797 digits. At n=64 the small-sample
# bias dominates: the committed teacher scores 28.0 here (7.15 at n=1000), random subsets of 64
# real digits score 27-44, its 4-step samples 43.6 and 1-step samples 938; an untrained UNet
# scores > 400. The bar catches a broken teacher, sampler or extractor, not small regressions
# (benchmarks/teacher_quality.py measures those with 1000 samples).
TEACHER_FID_64x64_BAR = 40.0


@pytest.fixture(scope="module")
def extractor():
    return load_digits_feature_extractor()


def _gaussian(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


def test_frechet_identical_is_zero():
    a = _gaussian(500, 16)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_grows_with_shift():
    a = _gaussian(2000, 16, seed=0)
    d = [frechet_distance(a, _gaussian(2000, 16, shift=s, seed=1)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert d[1] > 0
    assert d[0] < d[1] < d[2] < d[3]
    # A mean shift of s in each of 16 dims adds 16 s^2 (the covariance term stays ~0).
    assert d[3] == pytest.approx(16 * 4.0, rel=0.1)


def test_frechet_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_frechet_singular_covariance_is_finite():
    a, b = _gaussian(10, 64, seed=0), _gaussian(10, 64, seed=1)  # N < D: singular covariances
    assert np.isfinite(frechet_distance(a, b))


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_paired_psnr_known_value():
    a = np.zeros((2, 1, 4, 4))
    b = a.copy()
    b[0] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    b[1] += 0.02  # mse 4e-4 -> 40 dB
    assert paired_psnr(a, b) == pytest.approx(30.0)
    assert paired_psnr(a, a) == float("inf")
    with pytest.raises(ValueError):
        paired_psnr(a, b[:1])


def test_classifier_accuracy(extractor):
    assert extractor.test_accuracy >= 0.95  # as stored at training time
    _, _, x_te, y_te = quality.digits_split(extractor.metadata["seed"])
    assert (extractor.predict(x_te) == y_te).mean() >= 0.95  # and recomputed from the weights


def test_digit_features_and_floor(extractor):
    images, _ = quality.load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1.0 and images.max() == 1.0
    feats = extractor(images[:10])
    assert feats.shape == (10, 64)
    floor = quality.real_vs_real_floor(extractor)
    noise = np.random.default_rng(0).uniform(-1, 1, images.shape).astype(np.float32)
    assert 0 < floor < fid(images, noise, extractor) / 10


def test_random_projection_proxy():
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (20, 3, 32, 24)).astype(np.float32)
    ext = RandomProjectionExtractor(dim=32)
    f = ext(imgs)
    assert f.shape == (20, 32)
    np.testing.assert_array_equal(f, RandomProjectionExtractor(dim=32)(imgs))  # seeded
    assert isinstance(ext, quality.FeatureExtractor)
    assert fid(imgs, imgs) == pytest.approx(0.0, abs=1e-6)  # default: proxy for 3x32x24


@pytest.mark.slow
def test_teacher_loads_and_samples(extractor):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from optimizer.demo.train_teacher import ddim_sample, fixed_noise

    torch.set_num_threads(1)
    unet = UNet2DModel.from_pretrained(TEACHER_DIR / "unet", use_safetensors=True).eval()
    assert 0.5e6 < sum(p.numel() for p in unet.parameters()) < 2e6
    config = DDPMScheduler.load_config(TEACHER_DIR / "scheduler")
    assert config["prediction_type"] == "v_prediction"
    x = ddim_sample(unet, config, fixed_noise(64, seed=0), steps=64).clamp(-1, 1).numpy()
    real, _ = quality.load_digits_images()
    assert fid(x, real, extractor) < TEACHER_FID_64x64_BAR


def test_train_teacher_conditional_sees_each_batch_labels():
    """train(..., unet=, cond=) (benchmarks/cond_digits.py): the conditioning callable gets the digit
    labels of exactly the images in the batch, and the UNet learns with it."""
    import torch
    from diffusers import UNet2DConditionModel

    from optimizer.demo.train_teacher import TeacherConfig, train
    from tests.conftest import TINY_COND_UNET

    torch.set_num_threads(1)
    emb = torch.randn(10, 2, 16)
    seen = []

    def cond(labels):
        seen.append(labels.clone())
        return {"encoder_hidden_states": emb[labels]}

    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=1, out_channels=1, **TINY_COND_UNET)
    before = [p.detach().clone() for p in unet.parameters()]
    cfg = TeacherConfig(batch_size=32, warmup_iters=2)
    ema, _, _ = train(6, 0, cfg, unet=unet, cond=cond)
    assert len(seen) == 6 and all(len(s) == 32 for s in seen)
    # Batches follow one permutation of the data: the first batch's labels are those images' labels.
    _, labels = quality.load_digits_images()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], torch.as_tensor(labels)[perm[:32]])
    assert type(ema) is UNet2DConditionModel
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters(), strict=True))
