"""The text-to-image demo's data: coloured digits at 32x32 and prompts from a small grammar.

scikit-learn's 8x8 digits (0..16) are upsampled to 32x32 (bilinear, then clipped) and painted in
one colour of a small palette on black. Each image's prompt comes from a grammar with paraphrases
("a red seven", "the digit 7 in red", "seven, green"), so the text encoder has to learn that
"7" and "seven" mean the same thing and that word order varies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# RGB in [0, 1]; far apart in hue so that a small classifier separates them at 32x32
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (0.95, 0.2, 0.9),
    "cyan": (0.1, 0.9, 0.95),
}
COLOURS = tuple(PALETTE)
TEMPLATES = (
    "a {colour} {word}",
    "the digit {n} in {colour}",
    "{word}, {colour}",
    "a {colour} number {n}",
    "{colour} {n}",
    "the number {word} in {colour}",
)
# every word the grammar can emit: the tokenizer gets one BPE token per word
VOCAB_WORDS = tuple(
    sorted({*DIGIT_WORDS, *COLOURS, *(str(i) for i in range(10)), "a", "the", "digit", "in", "number", ","})
)
SIZE = 32


@dataclass(frozen=True)
class Example:
    digit: int
    colour: int
    prompt: str


def prompt_for(digit: int, colour: int, template: int) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(
        colour=COLOURS[colour], word=DIGIT_WORDS[digit], n=digit
    )


def upsample_digits(images8: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in 0..16 -> [N, 32, 32] masks in [0, 1] (bilinear, pixel-centre aligned)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images8.astype(np.float32) / 16.0)[:, None]
    up = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return up[:, 0].clamp(0, 1).numpy()


def render(masks: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """masks [N, 32, 32] in [0, 1], colour ids [N] -> images [N, 3, 32, 32] in [-1, 1]."""
    rgb = np.asarray([PALETTE[COLOURS[c]] for c in colours], np.float32)  # [N, 3]
    img = masks[:, None] * rgb[:, :, None, None]
    return (img * 2.0 - 1.0).astype(np.float32)


def load_digits8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@dataclass
class ColouredDigits:
    """All 1797 digits; each draw picks a colour and a template per image from the caller's rng."""

    masks: np.ndarray  # [N, 32, 32] in [0, 1]
    digits: np.ndarray  # [N]

    @classmethod
    def load(cls, indices: np.ndarray | None = None) -> ColouredDigits:
        images8, digits = load_digits8()
        if indices is not None:
            images8, digits = images8[indices], digits[indices]
        return cls(upsample_digits(images8), digits)

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[Example]]:
        idx = rng.integers(0, len(self.digits), n)
        colours = rng.integers(0, len(COLOURS), n)
        templates = rng.integers(0, len(TEMPLATES), n)
        ex = [
            Example(int(self.digits[i]), int(c), prompt_for(int(self.digits[i]), int(c), int(t)))
            for i, c, t in zip(idx, colours, templates, strict=True)
        ]
        return render(self.masks[idx], colours), ex


def evaluation_prompts(n: int, seed: int = 0) -> list[Example]:
    """A fixed, balanced prompt set: every (digit, colour) pair in turn, templates rotating."""
    rng = np.random.default_rng(seed)
    pairs = [(d, c) for d in range(10) for c in range(len(COLOURS))]
    order = rng.permutation(len(pairs))
    out = []
    for k in range(n):
        d, c = pairs[order[k % len(pairs)]]
        out.append(Example(d, c, prompt_for(d, c, k)))
    return out
