"""The text-to-image demo's data, tokenizer and judge (the teacher itself: benchmarks/t2i_demo.py)."""

from __future__ import annotations

import numpy as np

from optimizer.demo.t2i.classifier import load_judge, split_indices
from optimizer.demo.t2i.data import (
    COLOURS,
    DIGIT_WORDS,
    PALETTE,
    TEMPLATES,
    VOCAB_WORDS,
    ColouredDigits,
    evaluation_prompts,
)
from optimizer.demo.t2i.tokenizer import MODEL_MAX_LENGTH, build_tokenizer, save_tokenizer


def test_every_grammar_word_is_one_token_and_tokenizers_alone_agrees(tmp_path):
    from tokenizers import Tokenizer

    tok = build_tokenizer(VOCAB_WORDS)
    for word in VOCAB_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # start, the word, end
    save_tokenizer(VOCAB_WORDS, tmp_path)
    fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for p in ["a red seven", "the digit 7 in red", "seven, green", "an unknown word!"]:
        assert fast.encode(p).ids == tok(p).input_ids
    # the longest grammar prompt fits the demo's context with room to spare
    longest = max(
        (t.format(colour="magenta", word="seven", n=7) for t in TEMPLATES),
        key=lambda s: len(tok(s).input_ids),
    )
    assert len(tok(longest).input_ids) <= MODEL_MAX_LENGTH - 4


def test_rendered_digits_are_coloured_on_black():
    data = ColouredDigits.load(np.arange(50))
    x, ex = data.batch(np.random.default_rng(0), 16)
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert np.mean(x.max(1) < -0.95) > 0.25  # black background around the strokes (digits fill the frame)
    for img, e in zip(x, ex, strict=True):
        fg = img[:, (img.max(0) > 0.2)]  # foreground pixels [3, K]
        assert np.argmax(fg.mean(1)) == int(np.argmax(PALETTE[COLOURS[e.colour]]))
        assert DIGIT_WORDS[e.digit] in e.prompt or str(e.digit) in e.prompt
        assert COLOURS[e.colour] in e.prompt


def test_evaluation_prompts_cover_every_digit_and_colour():
    ex = evaluation_prompts(60)
    assert {(e.digit, e.colour) for e in ex} == {(d, c) for d in range(10) for c in range(len(COLOURS))}
    assert len({e.prompt for e in ex}) == 60


def test_committed_judge_is_accurate_on_held_out_digits():
    judge = load_judge()
    assert judge.metadata["test_accuracy"]["digit"] >= 0.98
    assert judge.metadata["test_accuracy"]["colour"] >= 0.99
    full = ColouredDigits.load()
    _, te = split_indices(len(full.digits))
    held_out = ColouredDigits(full.masks[te], full.digits[te])
    x, ex = held_out.batch(np.random.default_rng(123), 400)
    adh = judge.adherence(x, ex)
    assert adh.digit >= 0.97 and adh.colour >= 0.99
    # and it is not fooled by a wrong prompt: shuffled labels score near chance
    wrong = judge.adherence(x, ex[1:] + ex[:1])
    assert wrong.both < 0.2


def test_bundled_teacher_draws_the_digit_and_colour_it_is_asked_for():
    import json

    import torch
    from diffusers import StableDiffusionPipeline

    from optimizer.demo.t2i.evaluate import fixed_latents, sample_pipeline
    from optimizer.demo.t2i.train import DEFAULT_DIR

    meta = json.loads((DEFAULT_DIR / "teacher.json").read_text())
    assert meta["reference_steps"] == 50 and meta["reference_guidance_scale"] == 2.0
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(DEFAULT_DIR), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ex = evaluation_prompts(30, seed=5)
    images = sample_pipeline(pipe, ex, fixed_latents(30, seed=5), 8, 2.0)
    adh = load_judge().adherence(images, ex)
    # measured at 300 prompts, DDIM 50: digit 0.98, colour 1.00; at DDIM 8 on these 30: see assert
    assert adh.digit >= 0.85 and adh.colour >= 0.95, adh
    # and the prompt matters: the same latents under shuffled prompts no longer match their own
    assert load_judge().adherence(images, ex[7:] + ex[:7]).both < 0.3
