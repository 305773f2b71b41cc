"""Distribution-level quality metrics: FID in a feature space fit for the data, paired PSNR.

The bundled demo data are scikit-learn's digits (8x8, 1 channel). Their feature space is the
penultimate layer (64-d) of a small CNN digit classifier trained here, deterministically, on a
train split of the digits; its weights ship as ``optimizer/demo/digits_classifier.safetensors``.
Other datasets plug in their own ``FeatureExtractor``; for images that are not 8x8 1-channel,
``RandomProjectionExtractor`` is a seeded, download-free proxy.

Images everywhere are numpy float arrays [N, C, H, W] with values in [-1, 1].

Retrain the classifier (reproducible):  python -m optimizer.compile.quality --train
Print its accuracy and the real-vs-real FID floor:  python -m optimizer.compile.quality
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from optimizer.metrics import psnr_db

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DIGITS_CLASSIFIER_PATH = Path(__file__).parents[1] / "demo" / "digits_classifier.safetensors"
_METADATA_KEY = "dd_compile"  # safetensors metadata entry that holds our JSON
_CLASSIFIER_FORMAT = "dd-compile.digits-classifier/1"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as float32 [N, 1, 8, 8] in [-1, 1] (0..16 -> -1..1), labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # [N, 8, 8] -> [N, 1, 8, 8]
    return images, digits.target.astype(np.int64)


def digits_split(seed: int = 0, test_size: float = 0.25):
    """Stratified train/test split of the digits: (x_train, y_train, x_test, y_test)."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images()
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images [N, C, H, W] in [-1, 1] (numpy) to features [N, D] (numpy float64)."""

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    return images.astype(np.float32, copy=False)


def _build_digits_classifier():
    import torch.nn as nn

    class DigitsClassifier(nn.Module):
        """Small CNN over 8x8x1 digits; ``features()`` is the 64-d penultimate layer."""

        def __init__(self, feature_dim: int = 64, num_classes: int = 10) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # [N, 64, 4, 4]
                nn.Conv2d(64, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),  # [N, 64, 2, 2]
                nn.Flatten(),  # [N, 256]
                nn.Linear(256, feature_dim),
                nn.ReLU(),
            )
            self.head = nn.Linear(feature_dim, num_classes)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.head(self.body(x))

    return DigitsClassifier()


class DigitsFeatureExtractor:
    """Penultimate-layer (64-d) features of the bundled digit classifier, for 8x8 1-ch images."""

    input_shape = (1, 8, 8)

    def __init__(self, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
        self.model = model.eval()
        self.metadata = metadata

    @property
    def test_accuracy(self) -> float:
        return float(self.metadata["test_accuracy"])

    def __call__(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        import torch

        images = _check_images(images)
        if images.shape[1:] != self.input_shape:
            raise ValueError(
                f"the digits classifier takes [N, 1, 8, 8] images, got {images.shape}; "
                "use RandomProjectionExtractor (a proxy) or your own FeatureExtractor"
            )
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                out.append(self.model.features(torch.from_numpy(images[i : i + batch_size])))
        return torch.cat(out).double().numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class labels [N] (used to report the classifier's accuracy)."""
        import torch

        images = _check_images(images)
        with torch.no_grad():
            return self.model(torch.from_numpy(images)).argmax(1).numpy()


def load_digits_feature_extractor(
    path: str | Path = DIGITS_CLASSIFIER_PATH,
) -> DigitsFeatureExtractor:
    """Load the committed digit classifier (weights + JSON metadata with its test accuracy)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; train it with `python -m optimizer.compile.quality --train`"
        )
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: no '{_METADATA_KEY}' metadata entry; not a dd-compile file")
    metadata = json.loads(raw)
    if metadata.get("format") != _CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {_CLASSIFIER_FORMAT!r}")
    model = _build_digits_classifier()
    model.load_state_dict(load_file(str(path)))
    return DigitsFeatureExtractor(model, metadata)


def _area_resize(images: np.ndarray, size: int) -> np.ndarray:
    """Area (box) resize of [N, C, H, W] to [N, C, size, size]; each bin holds >= 1 pixel."""

    def bins(n: int) -> list[tuple[int, int]]:
        edges = [(math.floor(i * n / size), math.ceil((i + 1) * n / size)) for i in range(size)]
        return [(lo, max(hi, lo + 1)) for lo, hi in edges]

    rows, cols = bins(images.shape[2]), bins(images.shape[3])
    out = np.empty(images.shape[:2] + (size, size), dtype=np.float64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = images[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


@dataclass
class RandomProjectionExtractor:
    """PROXY feature space for any image shape: a fixed, seeded random projection of images
    area-downsampled to ``size`` x ``size``, followed by tanh.

    No training, no downloads, deterministic for a given (seed, C, size). It sees only coarse
    pixel statistics, not semantics: FID values from it are comparable with each other (same
    seed, same shapes) but not with Inception FID or with the digit-classifier FID. Prefer a
    feature extractor trained on the data where one exists.
    """

    dim: int = 64
    size: int = 8
    seed: int = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = _check_images(images)
        x = _area_resize(images, self.size).reshape(len(images), -1)  # [N, C*size*size]
        rng = np.random.default_rng(self.seed)
        w = rng.standard_normal((x.shape[1], self.dim)) / math.sqrt(x.shape[1])
        return np.tanh(x @ w)


def default_feature_extractor(image_shape: tuple[int, ...]) -> FeatureExtractor:
    """The digit classifier for [1, 8, 8] images; the random-projection proxy otherwise."""
    if tuple(image_shape) == DigitsFeatureExtractor.input_shape:
        return load_digits_feature_extractor()
    log.warning(
        "no trained feature extractor for images of shape %s: using the random-projection "
        "proxy (RandomProjectionExtractor)",
        tuple(image_shape),
    )
    return RandomProjectionExtractor()


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (Heusel et al. 2017).

        d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    Tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b.
    This avoids the complex parts that scipy.linalg.sqrtm returns for S_a S_b when the
    covariances are singular (N <= D); round-off negatives are clipped to 0.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected features [N, D] with the same D, got {a.shape}, {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or Inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
    cov_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])

    # 1. S_a^(1/2) by eigendecomposition of the symmetric S_a.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    # 2. Eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD) = eigenvalues of S_a S_b.
    m = sqrt_a @ cov_b @ sqrt_a
    ev = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(ev, 0.0, None)).sum()

    d2 = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(d2, 0.0)


def fid(images_a: np.ndarray, images_b: np.ndarray, extractor: FeatureExtractor | None = None) -> float:
    """FID between two image sets [N, C, H, W] in [-1, 1] in ``extractor``'s feature space.

    ``extractor=None`` picks ``default_feature_extractor`` for the image shape.
    """
    images_a, images_b = _check_images(images_a), _check_images(images_b)
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"image shapes differ: {images_a.shape[1:]} vs {images_b.shape[1:]}")
    if extractor is None:
        extractor = default_feature_extractor(images_a.shape[1:])
    return frechet_distance(extractor(images_a), extractor(images_b))


def paired_psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    """Mean over samples of the per-sample PSNR in dB (images in [-1, 1] -> data_range 2).

    `optimizer.metrics.psnr_db`, named for its use here (two batches drawn from the same noise);
    identical samples score +inf and non-finite values -inf (the policy in optimizer/metrics.py).
    """
    return psnr_db(a, b, data_range)


def real_vs_real_floor(extractor: FeatureExtractor | None = None, seed: int = 0) -> float:
    """FID between two disjoint random halves of the digits (898 vs 899): the metric's floor
    at this sample size. Sampled sets are not expected to score below it."""
    images, _ = load_digits_images()
    perm = np.random.default_rng(seed).permutation(len(images))
    half = len(images) // 2
    return fid(images[perm[:half]], images[perm[half:]], extractor)


# --------------------------------------------------------------------------------------------
# Training the digit classifier
# --------------------------------------------------------------------------------------------


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels, padding with background (-1)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * p)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


def train_digits_classifier(
    out: str | Path = DIGITS_CLASSIFIER_PATH, seed: int = 0, epochs: int = 40
) -> dict[str, Any]:
    """Train the digit classifier on the train split, save weights + metadata; return metadata."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split(seed)
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model = _build_digits_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_tr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(x_tr), 64):
            idx = perm[i : i + 64]
            xb = _random_shift(x_tr[idx], gen)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            log.info("epoch %d/%d  loss %.4f", epoch + 1, epochs, total / len(x_tr))
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(1).numpy()
    acc = float((pred == y_te).mean())
    metadata = {
        "format": _CLASSIFIER_FORMAT,
        "test_accuracy": acc,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "seed": seed,
        "epochs": epochs,
        "feature_dim": 64,
        "input": "[N, 1, 8, 8] float32 in [-1, 1] (sklearn digits 0..16 / 8 - 1)",
        "torch": torch.__version__,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={_METADATA_KEY: json.dumps(metadata)})
    tmp.replace(out)
    log.info("test accuracy %.4f (%d test images); saved %s", acc, len(x_te), out)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="retrain the digit classifier")
    parser.add_argument("--out", type=Path, default=DIGITS_CLASSIFIER_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(1)
    if args.train:
        train_digits_classifier(args.out, seed=args.seed, epochs=args.epochs)
    extractor = load_digits_feature_extractor(args.out)
    _, _, x_te, y_te = digits_split(extractor.metadata["seed"])
    acc = float((extractor.predict(x_te) == y_te).mean())
    log.info("classifier test accuracy %.4f (stored %.4f)", acc, extractor.test_accuracy)
    log.info("real-vs-real FID floor (898 vs 899): %.3f", real_vs_real_floor(extractor))


if __name__ == "__main__":
    main()  # `python -m` imported optimizer/__init__.py first: OMP_WAIT_POLICY is already set
