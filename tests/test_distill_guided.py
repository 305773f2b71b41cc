"""Guidance distillation primitives: the w embedding, the zero-init student, the guided target."""

from __future__ import annotations

import pytest
import torch

from engines.errors import InputError
from optimizer.distill.guided import (
    draw_w,
    guidance_embedding,
    guided_eps,
    make_w_student,
    parse_guidance_range,
    student_eps,
    w_from_scale,
)


def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def test_embedding_is_diffusers_lcm_embedding():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-6)
    assert guidance_embedding(w, 17).shape == (3, 17)


def test_student_starts_as_the_teachers_conditional_branch_for_every_w():
    teacher = tiny_cond_unet()
    student = make_w_student(teacher, 32).eval()
    g = torch.Generator().manual_seed(1)
    z, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 16, generator=g)
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        eps_c = teacher(z, t, encoder_hidden_states=text).sample
        for w in (0.0, 3.0, 7.0):
            got = student_eps(student, z, t, text, torch.full((3,), w))
            assert torch.equal(got, eps_c)
    # and the embedding path is live: a non-zero projection changes the output with w
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)
    with torch.no_grad():
        a = student_eps(student, z, t, text, torch.zeros(3))
        b = student_eps(student, z, t, text, torch.full((3,), 5.0))
    assert (a - b).abs().max() > 1e-3


def test_guided_target_is_diffusers_cfg_with_w_equal_scale_minus_one():
    teacher = tiny_cond_unet()
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    tc, tu = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    s = 4.5  # diffusers: eps_u + s (eps_c - eps_u)
    with torch.no_grad():
        eps_u = teacher(z, t, encoder_hidden_states=tu).sample
        eps_c = teacher(z, t, encoder_hidden_states=tc).sample
        ref = eps_u + s * (eps_c - eps_u)
        got = guided_eps(teacher, z, t, tc, tu, torch.full((2,), w_from_scale(s)))
    assert torch.allclose(got, ref, atol=1e-5)
    with torch.no_grad():  # w = 0 is the conditional model alone
        assert torch.allclose(guided_eps(teacher, z, t, tc, tu, torch.zeros(2)), eps_c, atol=1e-5)


def test_w_draws_cover_the_scale_range():
    w = draw_w(10_000, (2.0, 8.0), torch.Generator().manual_seed(0))
    assert 0.99 <= float(w.min()) < 1.01 and 6.99 < float(w.max()) <= 7.0


@pytest.mark.parametrize(
    "text,ok",
    [
        ("2:8", (2.0, 8.0)),
        ("4", (4.0, 4.0)),
        ("8:2", None),
        ("0.5:3", None),
        ("a:b", None),
        ("1:nan", None),
        ("1:2:3", None),
    ],
)
def test_guidance_range_parsing(text, ok):
    if ok:
        assert parse_guidance_range(text) == ok
    else:
        with pytest.raises(InputError, match="--guidance"):
            parse_guidance_range(text)
