"""The distribution-level verdict (student vs teacher) on real digits: it passes a student that
matches the teacher, and fails, naming why, one that drifts, collapses or goes non-finite."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.bars import ParityBars
from optimizer.compile.quality import load_digits_feature_extractor, load_digits_images
from optimizer.compile.validate import distribution


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_images()
    return images, load_digits_feature_extractor()


def _judge(student, teacher, real, extractor, **bars):
    return distribution(student, teacher, None, extractor, real, "digits", ParityBars(**bars))


def test_a_student_that_matches_its_teacher_passes(digits):
    images, ex = digits
    rng = np.random.default_rng(0)
    teacher = images[:600]
    student = np.clip(teacher + 0.02 * rng.standard_normal(teacher.shape).astype(np.float32), -1, 1)
    d = _judge(student, teacher, images[600:], ex)
    assert d.passed, d.notes
    assert d.fid_student < 1.5 * d.fid_teacher and d.paired_psnr_db > 30


def test_a_collapsed_student_fails_the_fid_margin_and_says_so(digits):
    images, ex = digits
    teacher = images[:600]
    student = np.repeat(images[:1], 600, axis=0)  # mode collapse: one digit for every noise
    d = _judge(student, teacher, images[600:], ex, min_paired_psnr_db=-100.0)
    assert not d.passed
    assert d.fid_student > 10 * d.fid_teacher
    assert any(n.startswith("student FID") and "x teacher" in n for n in d.notes), d.notes


def test_a_student_that_drifts_from_its_teacher_fails_paired_psnr(digits):
    images, ex = digits
    teacher = images[:600]
    student = images[600:1200]  # as good a distribution, but not the teacher's samples for that noise
    d = _judge(student, teacher, images[1200:], ex)
    assert d.fid_student < 1.5 * d.fid_teacher  # the distribution is fine ...
    assert not d.passed and d.paired_psnr_db < 15  # ... the pairing is not
    assert any("paired PSNR" in n for n in d.notes), d.notes


def test_non_finite_samples_are_a_failed_named_result(digits):
    images, ex = digits
    student = images[:100].copy()
    student[3, 0, 0, 0] = np.nan
    d = _judge(student, images[:100], images[100:], ex)
    assert not d.passed and d.fid_student is None
    assert any("1 of 100 samples have NaN/Inf" in n for n in d.notes), d.notes
