"""engines/schedulers.py against diffusers' own scheduler classes: the same timesteps, init_noise_sigma,
model inputs and samples at every step, from the same random model outputs (and the same noise for
the stochastic ones); then whole tiny pipelines, runtime vs diffusers, per scheduler."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest

from engines.errors import InputError
from tests.t2i_tiny import make_tiny_pipeline

# SD 1.x's betas and offset (its scheduler_config.json); v_prediction as SD 2.x 768
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
STEPS = (1, 2, 4, 7, 25)
# max |ours - diffusers| over every step of every case, per scheduler (printed by the last test)
MAX_DIFF: dict[str, float] = {}


def _drive(ref, ours, steps: int, *, stochastic: bool = False, seed: int = 0, mu: float | None = None):
    """Both schedulers from the same latents and model outputs; asserts each step, returns max |diff|."""
    import torch

    kw = {} if mu is None else {"mu": mu}
    ref.set_timesteps(steps, **kw)
    ts = ours.set_timesteps(steps, **kw)
    want_ts = ref.timesteps.numpy()
    assert ts.shape == want_ts.shape
    if np.issubdtype(want_ts.dtype, np.integer):
        np.testing.assert_array_equal(ts, want_ts)
    else:  # float32 timesteps (Karras, continuous, flow): the model's input
        np.testing.assert_allclose(ts, want_ts, rtol=1e-6, atol=1e-5)
    sigma0 = getattr(ref, "init_noise_sigma", 1.0)
    np.testing.assert_allclose(np.float32(ours.init_noise_sigma), np.float32(sigma0), rtol=1e-6)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, 4, 8, 8), dtype=np.float32) * np.float32(ours.init_noise_sigma)).astype(
        np.float32
    )
    xt = torch.from_numpy(x.copy())
    gen, gen_copy = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    worst, last = 0.0, len(want_ts) - 1
    for i, t in enumerate(ref.timesteps):
        if hasattr(ref, "scale_model_input"):
            got = ours.scale_model_input(xt.numpy(), i)  # the same input: the scaling alone
            np.testing.assert_allclose(got, ref.scale_model_input(xt, t).numpy(), rtol=1e-6, atol=1e-7)
        out = rng.standard_normal(x.shape, dtype=np.float32)
        skw = {"generator": gen} if stochastic else {}
        xt = ref.step(torch.from_numpy(out), t, xt, return_dict=False, **skw)[0]
        noise = None
        if stochastic:  # the draw diffusers' step made (it draws at the last step too; we do not)
            drawn = torch.randn(x.shape, generator=gen_copy).numpy()
            noise = None if i == last else drawn
        x, d = ours.step(out, i, x, noise)
        assert x.dtype == np.float32 and d is x
        np.testing.assert_allclose(x, xt.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {i} of {steps}")
        worst = max(worst, float(np.abs(x - xt.numpy()).max()))
    return worst


def _record(name: str, diff: float) -> None:
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)


EULER = [
    dict(SD15, timestep_spacing="leading"),
    dict(SD15, timestep_spacing="linspace"),
    dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(SD15, timestep_spacing="leading", use_karras_sigmas=True),
    dict(SD15, use_karras_sigmas=True, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(use_exponential_sigmas=True, prediction_type="sample"),
    dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    dict(SD15, use_karras_sigmas=True, sigma_min=0.03, sigma_max=10.0),
    dict(SD15, prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("kw", EULER, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_euler_matches_diffusers(kw, steps):
    from diffusers import EulerDiscreteScheduler

    from engines.schedulers import make_scheduler

    ref = EulerDiscreteScheduler(**kw)
    _record("euler", _drive(ref, make_scheduler("euler", dict(ref.config)), steps))


EULER_A = [
    dict(SD15, timestep_spacing="leading"),
    dict(SD15, timestep_spacing="linspace"),
    dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("kw", EULER_A, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_euler_ancestral_matches_diffusers_given_its_noise(kw, steps):
    from diffusers import EulerAncestralDiscreteScheduler

    from engines.schedulers import make_scheduler

    ref = EulerAncestralDiscreteScheduler(**kw)
    ours = make_scheduler("euler_ancestral", dict(ref.config))
    assert ours.stochastic
    _record("euler_ancestral", _drive(ref, ours, steps, stochastic=True))


DPM = [
    dict(SD15),  # diffusers' defaults: dpmsolver++, order 2, midpoint, linspace, final sigma 0
    dict(SD15, timestep_spacing="leading"),
    dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(SD15, use_karras_sigmas=True),
    dict(SD15, use_karras_sigmas=True, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(SD15, euler_at_final=True, final_sigmas_type="sigma_min"),
    dict(SD15, solver_order=1),
    dict(SD15, solver_order=3),
    dict(SD15, solver_type="heun", use_karras_sigmas=True),
    dict(SD15, use_lu_lambdas=True),
    dict(SD15, use_exponential_sigmas=True),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, prediction_type="sample"),
    dict(SD15, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("kw", DPM, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_dpm_solver_multistep_matches_diffusers(kw, steps):
    from diffusers import DPMSolverMultistepScheduler

    from engines.schedulers import make_scheduler

    ref = DPMSolverMultistepScheduler(**kw)
    ours = make_scheduler("dpm_multistep", dict(ref.config))
    _record("dpm_multistep", _drive(ref, ours, steps))
    _drive(ref, ours, steps, seed=1)  # set_timesteps restarts the multistep state


PNDM = [
    dict(SD15, skip_prk_steps=True, set_alpha_to_one=False),  # SD 1.5 as shipped
    dict(SD15, skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(skip_prk_steps=True, timestep_spacing="linspace", set_alpha_to_one=True),
    dict(SD15, skip_prk_steps=False),
    dict(SD15, skip_prk_steps=False, timestep_spacing="linspace", prediction_type="v_prediction"),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("kw", PNDM, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_pndm_matches_diffusers(kw, steps):
    from diffusers import PNDMScheduler

    from engines.schedulers import make_scheduler

    ref = PNDMScheduler(**kw)
    ours = make_scheduler("pndm", dict(ref.config))
    if not kw["skip_prk_steps"] and steps < 4:  # diffusers fails inside set_timesteps there
        with pytest.raises(InputError, match=r"num_inference_steps=\d: must be an integer in \[4, 1000\]"):
            ours.set_timesteps(steps)
        return
    _record("pndm", _drive(ref, ours, steps))


FLOW = [
    dict(),
    dict(shift=3.0),  # SD3
    dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),  # Flux: mu per size
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(shift=3.0, shift_terminal=0.1),
    dict(shift=3.0, use_karras_sigmas=True),
    dict(shift=3.0, use_exponential_sigmas=True),
    dict(shift=3.0, stochastic_sampling=True),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("kw", FLOW, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_flow_match_euler_matches_diffusers(kw, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engines.schedulers import make_scheduler

    ref = FlowMatchEulerDiscreteScheduler(**kw)
    ours = make_scheduler("flow_euler", dict(ref.config))
    mu = None
    if kw.get("shift_terminal") and steps == 1:  # diffusers' sigmas are NaN there; refused
        with pytest.raises(InputError, match="shift_terminal .* needs 2 or more"):
            ours.set_timesteps(steps)
        return
    if kw.get("use_dynamic_shifting"):
        mu = ours.mu_for(4096)  # a 1024x1024 Flux image: (1024 / 16) ** 2 tokens
        assert mu == pytest.approx(1.15)
        with pytest.raises(InputError, match="use_dynamic_shifting needs mu"):
            ours.set_timesteps(steps)
    _record("flow_euler", _drive(ref, ours, steps, stochastic=ours.stochastic, mu=mu))


CLASSES = {
    "EulerDiscreteScheduler": "EULER_OPTIONS",
    "EulerAncestralDiscreteScheduler": "EULER_ANCESTRAL_OPTIONS",
    "DPMSolverMultistepScheduler": "DPM_OPTIONS",
    "PNDMScheduler": "PNDM_OPTIONS",
    "FlowMatchEulerDiscreteScheduler": "FLOW_OPTIONS",
}


@pytest.mark.parametrize("cls", CLASSES)
def test_options_are_diffusers_signature(cls):
    """Every option of the diffusers class is known with its default: a config without a key samples
    as diffusers' from_config would, and no option goes unseen."""
    import diffusers

    import engines.schedulers as S

    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    want = {k: p.default for k, p in params.items() if k != "self"}
    assert getattr(S, CLASSES[cls]) == want
    kinds = {**S.SCHEDULER_CLASSES, **S.FLOW_SCHEDULER_CLASSES}
    assert type(S.make_scheduler(kinds[cls], {})).cls == cls


REFUSED = [
    ("dpm_multistep", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    ("dpm_multistep", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
    ("dpm_multistep", dict(thresholding=True), "thresholding"),
    ("dpm_multistep", dict(variance_type="learned_range"), "variance_type='learned_range'"),
    ("dpm_multistep", dict(use_flow_sigmas=True), "use_flow_sigmas=True"),
    ("dpm_multistep", dict(use_beta_sigmas=True), "use_beta_sigmas=True"),
    ("dpm_multistep", dict(solver_order=4), "solver_order=4"),
    ("euler", dict(interpolation_type="log_linear"), "interpolation_type='log_linear'"),
    ("euler", dict(use_karras_sigmas=True, use_exponential_sigmas=True), "use_karras_sigmas and use_exp"),
    ("euler_ancestral", dict(prediction_type="sample"), "prediction_type='sample'"),
    ("pndm", dict(prediction_type="sample"), "prediction_type='sample'"),
    ("flow_euler", dict(invert_sigmas=True), "invert_sigmas=True"),
    ("flow_euler", dict(use_beta_sigmas=True), "use_beta_sigmas=True"),
    ("euler", dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid'"),
]


@pytest.mark.parametrize("kind,config,match", REFUSED, ids=[f"{k}-{m}" for k, _, m in REFUSED])
def test_unsupported_options_refused_by_name(kind, config, match):
    from engines.schedulers import make_scheduler

    where = "pipe/scheduler/scheduler_config.json"
    with pytest.raises(InputError, match=f"^{where}: .*{match}") as e:
        make_scheduler(kind, config, where=where)
    assert "\n" not in str(e.value)


def test_kinds_flow_through_the_family_table():
    """export.scheduler_kind asks the sd family table, which reads SCHEDULER_CLASSES."""
    from engines.schedulers import FLOW_SCHEDULER_CLASSES, SCHEDULER_CLASSES
    from optimizer.t2i.export import scheduler_kind

    for cls, kind in SCHEDULER_CLASSES.items():
        assert scheduler_kind({"_class_name": cls}) == kind
    for cls in FLOW_SCHEDULER_CLASSES:  # not a UNet pipeline's scheduler
        with pytest.raises(InputError, match=f"scheduler '{cls}' is not implemented"):
            scheduler_kind({"_class_name": cls})


# -- whole pipelines: runtime vs diffusers ------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from optimizer.metrics import psnr_db

    return psnr_db(a.astype(np.float64), b.astype(np.float64), data_range=255.0)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched_sd")
    return make_tiny_pipeline(root / "pipe")


PIPELINES = [
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", PIPELINES, ids=[c for c, _ in PIPELINES])
def test_runtime_pipeline_matches_diffusers(tiny_sd, tmp_path, cls, kw):
    """A tiny SD pipeline saved with each scheduler, exported, sampled by engines.t2i and by diffusers
    from the same latents (Euler ancestral: the same per-seed step draws)."""
    import diffusers

    from engines.schedulers import SCHEDULER_CLASSES
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, images

    src = tmp_path / "pipe"
    shutil.copytree(tiny_sd, src)
    cfg_path = src / "scheduler" / "scheduler_config.json"
    sched = getattr(diffusers, cls).from_config({**json.loads(cfg_path.read_text()), **kw})
    shutil.rmtree(src / "scheduler")
    sched.save_pretrained(src / "scheduler")
    loaded = load_pipeline(src)
    out = export_pipeline(loaded, tmp_path / "out")
    t2i = json.loads((out / "t2i.json").read_text())
    assert t2i["scheduler"]["kind"] == SCHEDULER_CLASSES[cls]
    ref = diffusers_pipeline(loaded)
    assert type(ref.scheduler).__name__ == cls
    prompts = ["a red seven", "Green  SEVEN, green!"]
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    parity = {}
    with TextToImagePipeline(out) as pipe:
        assert type(pipe.scheduler).cls == cls
        for steps, g in ((4, 7.5), (7, 1.0)):
            ours = pipe(prompts, latents=lat, guidance_scale=g, num_inference_steps=steps, seeds=[5, 6])
            want = images(ref, prompts, lat, steps, g, seeds=[5, 6])
            assert ours.shape == want.shape == (2, 16, 16, 3) and ours.std() > 10
            parity[(steps, g)] = psnr(ours, want)
        # the scheduler matters more than our error: diffusers' DDIM from the same latents is further
        # (Euler is DDIM's ODE in sigma space: close, but not equal)
        ours_sched = ref.scheduler
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
        ddim = images(ref, prompts, lat, 4, 7.5, seeds=[5, 6])
        ref.scheduler = ours_sched
        vs_ddim = psnr(ddim, images(ref, prompts, lat, 4, 7.5, seeds=[5, 6]))
        assert vs_ddim < parity[(4, 7.5)]
        if pipe.scheduler.stochastic:  # the draws matter: other seeds, another image
            other = images(ref, prompts, lat, 4, 7.5, seeds=[7, 8])
            assert psnr(other, images(ref, prompts, lat, 4, 7.5, seeds=[5, 6])) < 35
    print(f"\n{cls} fp32 PSNR vs diffusers (dB): {parity}; DDIM vs it: {vs_ddim:.1f}")
    assert min(parity.values()) >= 40.0, parity


@pytest.mark.slow
def test_lcm_multistep_runtime_matches_diffusers(tmp_path):
    """reference.images hands diffusers' LCMScheduler the runtime's per-seed re-noising draws: 4 steps."""
    from engines.t2i import TextToImagePipeline
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from optimizer.t2i.reference import diffusers_pipeline, images

    loaded = load_pipeline(make_tiny_pipeline(tmp_path / "pipe", lcm=True))
    out = export_pipeline(loaded, tmp_path / "out")
    ref = diffusers_pipeline(loaded)
    prompts = ["a red seven", "Green  SEVEN, green!"]
    lat = np.random.default_rng(4).standard_normal((2, 4, 8, 8), dtype=np.float32)
    with TextToImagePipeline(out) as pipe:
        ours = pipe(prompts, latents=lat, guidance_scale=8.5, num_inference_steps=4, seeds=[5, 6])
    want = images(ref, prompts, lat, 4, 8.5, seeds=[5, 6])
    other = images(ref, prompts, lat, 4, 8.5, seeds=[7, 8])
    assert psnr(ours, want) >= 40.0 and psnr(other, want) < 35


def test_zz_report_max_diffs():
    """The max |ours - diffusers| per scheduler over the cases above (when they ran in this session)."""
    print(f"\nmax |ours - diffusers| per scheduler: {MAX_DIFF}")
