"""Reference model configs (random weights here: no model hub) for tests and benchmarks."""

# google/ddpm-cifar10-32 unet/config.json: UNet2DModel, 35.7M parameters.
DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)

# runwayml/stable-diffusion-v1-5 unet/config.json (the rest are UNet2DConditionModel defaults).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
