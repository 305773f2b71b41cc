"""Shared fixtures; gpu/tensorrt tests skip with the reason where CUDA or TensorRT is absent."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere

import importlib.util

import pytest


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def shared_export_cache(tmp_path_factory):
    """One export cache for the session (shared by xdist workers, whose basetemps sit in one
    folder): the same tiny model is exported once, not by every test that compiles it
    (tests/test_export_cache.py tests the cache itself). DD_TEST_EXPORT_CACHE=off exports always."""
    if os.environ.get("DD_TEST_EXPORT_CACHE") == "off":
        yield None
        return
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "export-cache"
    old = os.environ.get("DD_COMPILE_EXPORT_CACHE")
    os.environ["DD_COMPILE_EXPORT_CACHE"] = str(root)  # subprocesses (dd-compile runs) inherit it
    yield root
    if old is None:
        os.environ.pop("DD_COMPILE_EXPORT_CACHE", None)
    else:
        os.environ["DD_COMPILE_EXPORT_CACHE"] = old


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none visible to torch)"))
        if "tensorrt" in item.keywords:
            if not has_trt:
                item.add_marker(
                    pytest.mark.skip(
                        reason="needs TensorRT: pip install --extra-index-url https://pypi.nvidia.com "
                        "'dd-compile[tensorrt]' on a machine with an NVIDIA GPU"
                    )
                )
            elif not has_cuda:
                item.add_marker(
                    pytest.mark.skip(reason="TensorRT is installed but no CUDA device is visible")
                )


TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


# A text-conditioned UNet2DConditionModel of the same size (cross-attention in the first block).
TINY_COND_UNET = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def make_tiny_teacher(path, seed=0, prediction_type="v_prediction", clip_sample=False):
    """A real diffusers UNet2DModel + DDPMScheduler folder (random weights), like the demo's."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(**TINY_UNET).save_pretrained(path / "unet")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    ).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def t2i_folder(tmp_path_factory):
    """A tiny random-weight StableDiffusionPipeline (CFG, DDIM) exported for the torch-free runtime:
    t2i.json + onnx/ + tokenizer/ + scheduler/ (about 30 s on one core; shared by the Triton and
    dd-serve text-to-image tests)."""
    import torch

    from engines.iospec import DimRange
    from optimizer.t2i.components import Profile
    from optimizer.t2i.export import export_pipeline
    from optimizer.t2i.load import load_pipeline
    from tests.t2i_tiny import make_tiny_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("t2i_folder")
    src = make_tiny_pipeline(root / "pipe")
    lat = DimRange(8, 8, 16)
    profile = Profile(latent_height=lat, latent_width=lat)
    return export_pipeline(load_pipeline(src, profile=profile), root / "out")
