"""The text-to-image demo's judge: a digit-and-colour classifier on 32x32 RGB images.

Its penultimate layer (64-d) is the FID feature space of the demo, and its two heads give prompt
adherence: the fraction of generated images whose digit and colour match the prompt. Trained
deterministically on the rendered train split of the digits (75%), tested on the held-out 25%
with random colours; the test accuracy ships in the weights' metadata.

    python -m optimizer.demo.t2i.classifier --train     # rewrites the committed weights
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optimizer.demo.t2i.data import COLOURS, ColouredDigits, Example

log = logging.getLogger(__name__)

CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
_FORMAT = "dd-compile.t2i-digit-colour-classifier/1"
_METADATA_KEY = "dd_compile"


class DigitColourNet(nn.Module):
    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 32, 16, 16]
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 64, 8, 8]
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 64, 4, 4]
            nn.Flatten(),
            nn.Linear(64 * 16, feature_dim),
            nn.ReLU(),
        )
        self.digit = nn.Linear(feature_dim, 10)
        self.colour = nn.Linear(feature_dim, len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.digit(f), self.colour(f)


@dataclass
class Adherence:
    digit: float  # fraction of images classified as the prompt's digit
    colour: float
    both: float

    def to_dict(self) -> dict[str, float]:
        return {"digit": self.digit, "colour": self.colour, "both": self.both}


class DigitColourJudge:
    """Features (for FID) and prompt adherence of [N, 3, 32, 32] images in [-1, 1]."""

    def __init__(self, model: DigitColourNet, metadata: dict[str, Any]) -> None:
        self.model = model.eval()
        self.metadata = metadata

    @torch.no_grad()
    def _run(self, images: np.ndarray, batch: int = 512):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"the digit-colour classifier takes [N, 3, 32, 32] images, got {images.shape}")
        outs = [self.model(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)]
        return [torch.cat([o[k] for o in outs]).numpy() for k in range(3)]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[0].astype(np.float64)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, d, c = self._run(images)
        return d.argmax(1), c.argmax(1)

    def adherence(self, images: np.ndarray, examples: Sequence[Example]) -> Adherence:
        d, c = self.predict(images)
        want_d = np.asarray([e.digit for e in examples])
        want_c = np.asarray([e.colour for e in examples])
        return Adherence(
            float(np.mean(d == want_d)),
            float(np.mean(c == want_c)),
            float(np.mean((d == want_d) & (c == want_c))),
        )


def split_indices(n: int, seed: int = 0, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * test_fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


def train_classifier(out: Path = CLASSIFIER_PATH, iters: int = 1500, seed: int = 0) -> dict[str, Any]:
    from safetensors.torch import save_file

    from engines.fileio import atomic_path

    torch.manual_seed(seed)
    full = ColouredDigits.load()
    tr, te = split_indices(len(full.digits), seed)
    train_set = ColouredDigits(full.masks[tr], full.digits[tr])
    test_set = ColouredDigits(full.masks[te], full.digits[te])
    rng = np.random.default_rng(seed)
    net = DigitColourNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for it in range(iters):
        x, ex = train_set.batch(rng, 128)
        x = torch.from_numpy(x)
        # one-pixel shifts and a little noise: generated digits are never pixel-exact
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        x = torch.roll(x, (dy, dx), (2, 3)) + 0.05 * torch.randn(x.shape, generator=gen)
        _, d, c = net(x)
        loss = nn.functional.cross_entropy(
            d, torch.tensor([e.digit for e in ex])
        ) + nn.functional.cross_entropy(c, torch.tensor([e.colour for e in ex]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 300 == 0:
            log.info("classifier %d/%d loss %.4f", it, iters, loss.item())
    judge = DigitColourJudge(net, {})
    x, ex = test_set.batch(np.random.default_rng(seed + 1), 2000)
    acc = judge.adherence(x, ex)
    meta = {"format": _FORMAT, "test_accuracy": acc.to_dict(), "iters": iters, "seed": seed}
    with atomic_path(out, ".safetensors") as tmp:
        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()},
            str(tmp),
            {_METADATA_KEY: json.dumps(meta)},
        )
    log.info("classifier: test accuracy digit %.3f, colour %.3f", acc.digit, acc.colour)
    return meta


def load_judge(path: str | Path = CLASSIFIER_PATH) -> DigitColourJudge:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; train it with `python -m optimizer.demo.t2i.classifier --train`"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {_FORMAT!r}")
    net = DigitColourNet()
    net.load_state_dict(load_file(str(path)))
    return DigitColourJudge(net, meta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.train:
        print(json.dumps(train_classifier(a.out, a.iters), indent=2))


if __name__ == "__main__":
    main()
