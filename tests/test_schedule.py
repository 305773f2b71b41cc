"""The numpy few-step sampler against diffusers' DDIMScheduler, and the IO spec checks."""

import numpy as np
import pytest
import torch

from engines.errors import InputError
from engines.iospec import DimRange, IOSpec, TensorSpec
from engines.schedule import (
    Sampler,
    SamplingSchedule,
    draw_noise,
    predict_x0_eps,
    trailing_timesteps,
)
from engines.torch_runner import TorchRunner
from optimizer.model_io import io_spec_for
from optimizer.models import Denoiser, load_teacher, teacher_reference_samples


@pytest.mark.parametrize("pred", ["v_prediction", "epsilon", "sample"])
def test_predict_x0_eps_inverts_forward_process(pred):
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    a = 0.37
    z = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    out = {"v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0, "epsilon": eps, "sample": x0}[pred]
    x0_hat, eps_hat = predict_x0_eps(z, out.astype(np.float32), a, pred)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-5)


def test_trailing_timesteps_match_diffusers():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for n in (1, 2, 4, 64):
        s.set_timesteps(n)
        assert trailing_timesteps(1000, n) == s.timesteps.tolist()


def test_numpy_ddim_matches_diffusers_ddim(tiny_teacher_dir):
    """Our sampler with a torch runner == diffusers' DDIMScheduler loop, same noise."""
    teacher = load_teacher(tiny_teacher_dir)
    spec = io_spec_for(teacher.model_class, dict(teacher.model.config))
    noise, _ = draw_noise([0, 1, 2], (1, 8, 8), 4)
    ref = teacher_reference_samples(teacher, torch.from_numpy(noise), steps=4).numpy()
    with TorchRunner(Denoiser(teacher.model), spec) as r:
        ours = Sampler(teacher.schedule(4), r).from_seeds([0, 1, 2], (1, 8, 8))
    assert np.abs(ours - ref).max() < 1e-4


def test_consistency_sampler_needs_step_noise_and_is_deterministic_given_it(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    spec = io_spec_for(teacher.model_class, dict(teacher.model.config))
    sch = SamplingSchedule.from_dict({**teacher.schedule(2).to_dict(), "kind": "consistency"})
    with TorchRunner(Denoiser(teacher.model), spec) as r:
        sampler = Sampler(sch, r)
        noise, step_noise = draw_noise([5], (1, 8, 8), 2)
        with pytest.raises(ValueError, match="step_noise"):
            sampler(noise)
        a, b = sampler(noise, step_noise), sampler(noise, step_noise)
        c = sampler(noise, step_noise * 0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # the per-step noise is used


def test_draw_noise_is_per_seed():
    n1, _ = draw_noise([3, 4], (1, 2, 2), 1)
    n2, _ = draw_noise([4], (1, 2, 2), 1)
    np.testing.assert_array_equal(n1[1], n2[0])


def test_iospec_collects_every_problem():
    spec = IOSpec(
        "unet2d",
        (TensorSpec("sample", "float32", ("batch", 1, 8, 8)), TensorSpec("timestep", "float32", ("batch",))),
        (TensorSpec("out_sample", "float32", ("batch", 1, 8, 8)),),
        {"batch": DimRange(1, 4, 4)},
    )
    good = {"sample": np.zeros((2, 1, 8, 8), np.float32), "timestep": np.zeros((2,), np.float32)}
    spec.check_feeds(good)
    bad = {
        "sample": np.zeros((5, 1, 8, 7), np.float64),
        "timestep": np.zeros((3,), np.float32),
        "x": good["sample"],
    }
    with pytest.raises(InputError) as e:
        spec.check_feeds(bad)
    msg = str(e.value)
    for part in (
        "unexpected input(s) ['x']",
        "dtype float64",
        "axis 3 is 7",
        "outside [1, 4]",
        "other inputs say",
    ):
        assert part in msg
    assert IOSpec.from_dict(spec.to_dict()) == spec
    assert spec.profiles()["sample"] == ((1, 1, 8, 8), (4, 1, 8, 8), (4, 1, 8, 8))
    assert spec.dynamic_axes() == {
        "sample": {0: "batch"},
        "timestep": {0: "batch"},
        "out_sample": {0: "batch"},
    }


def test_clipping_teacher_keeps_clipping_and_matches_diffusers(tmp_path):
    """A teacher trained with clip_sample (google/ddpm-cifar10-32) is sampled with x0 clipped."""
    from tests.conftest import make_tiny_teacher

    teacher = load_teacher(make_tiny_teacher(tmp_path, prediction_type="epsilon", clip_sample=True))
    sch = teacher.schedule(4)
    assert sch.clip_sample == 1.0
    spec = io_spec_for(teacher.model_class, dict(teacher.model.config))
    noise, _ = draw_noise([0, 1], (1, 8, 8), 4)
    ref = teacher_reference_samples(teacher, torch.from_numpy(noise), steps=4).numpy()
    with TorchRunner(Denoiser(teacher.model), spec) as r:
        ours = Sampler(sch, r).from_seeds([0, 1], (1, 8, 8))
    assert np.abs(ours - ref).max() < 1e-4 and np.abs(ours).max() <= 1.0 + 1e-5
