"""How prompts become the denoiser's conditioning: one recipe per family (the family table's
`conditioning`), each following its diffusers pipeline's `encode_prompt` and added conditioning.

A recipe takes the pipeline's text parts, the prompts and negative prompts of one chunk (a negative
of None: none was given), whether the CFG batch runs, and the image size, and returns the UNet's
conditioning feeds at batch B (2B under CFG: negatives first, as diffusers concatenates them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Encode = Callable[[str, Any, list[str], str], dict[str, np.ndarray]]  # (runner, tokenizer, prompts, what)


def _texts(prompts: Sequence[str | None]) -> list[str]:
    return ["" if p is None else p for p in prompts]


def sd(
    text: Any, encode: Encode, prompts: list[str], neg: list[str | None], do_cfg: bool, size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """StableDiffusionPipeline: the text encoder's last hidden state; under CFG the negative
    prompts' ("" when none was given) before the prompts'."""
    emb = encode(text.encoder, text.tokenizer, prompts, "prompt")[text.output]
    if do_cfg:
        neg_emb = encode(text.encoder, text.tokenizer, _texts(neg), "negative_prompt")[text.output]
        emb = np.concatenate([neg_emb, emb])
    return {"encoder_hidden_states": emb.astype(np.float32)}


def _sdxl_embeddings(
    text: Any, encode: Encode, prompts: list[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Both encoders' penultimate states concatenated on the channel axis; encoder 2's pooled one."""
    out1 = encode(text.encoder, text.tokenizer, prompts, what)
    ((enc2, tok2),) = text.more
    out2 = encode(enc2, tok2, prompts, what)
    states = np.concatenate([out1["penultimate_hidden_state"], out2["penultimate_hidden_state"]], axis=-1)
    return states.astype(np.float32), out2["text_embeds"].astype(np.float32)


def sdxl(
    text: Any, encode: Encode, prompts: list[str], neg: list[str | None], do_cfg: bool, size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """StableDiffusionXLPipeline (clip_skip None, prompt_2 = prompt): prompt_embeds, the pooled
    `text_embeds` and `time_ids` = original size + crop (0, 0) + target size, all the image size.
    With force_zeros_for_empty_prompt, an image whose negative prompt was not given gets zero
    negative embeddings (diffusers zeroes when the call's negative_prompt is None)."""
    states, pooled = _sdxl_embeddings(text, encode, prompts, "prompt")
    b = len(prompts)
    h, w = size
    time_ids = np.tile(np.array([[h, w, 0, 0, h, w]], dtype=np.float32), (b, 1))
    if not do_cfg:
        return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids}
    zero = np.array([n is None and text.zero_negative for n in neg])
    neg_states, neg_pooled = np.zeros_like(states), np.zeros_like(pooled)
    if not zero.all():
        idx = np.flatnonzero(~zero)
        s, p = _sdxl_embeddings(text, encode, [_texts(neg)[i] for i in idx], "negative_prompt")
        neg_states[idx], neg_pooled[idx] = s, p
    return {
        "encoder_hidden_states": np.concatenate([neg_states, states]),
        "text_embeds": np.concatenate([neg_pooled, pooled]),
        "time_ids": np.concatenate([time_ids, time_ids]),
    }


def _sd3_embeddings(
    text: Any, encode: Encode, prompts: list[str], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """StableDiffusion3Pipeline.encode_prompt (clip_skip None, prompt_2 = prompt_3 = prompt): both
    CLIP encoders' penultimate states concatenated on channels, zero-padded (or cut) to T5's width, then T5's
    states after them on the sequence axis; pooled = both CLIP projections concatenated."""
    (enc2, tok2), (enc3, tok3) = text.more
    o1 = encode(text.encoder, text.tokenizer, prompts, what)
    o2 = encode(enc2, tok2, prompts, what)
    t5 = encode(enc3, tok3, prompts, what)["last_hidden_state"]
    clip = np.concatenate([o1["penultimate_hidden_state"], o2["penultimate_hidden_state"]], axis=-1)
    w = t5.shape[-1]  # torch's pad by a negative width crops: diffusers' rule for CLIP wider than T5
    clip = clip[..., :w] if clip.shape[-1] >= w else np.pad(clip, ((0, 0), (0, 0), (0, w - clip.shape[-1])))
    states = np.concatenate([clip, t5], axis=1)
    pooled = np.concatenate([o1["text_embeds"], o2["text_embeds"]], axis=-1)
    return states.astype(np.float32), pooled.astype(np.float32)


def sd3(
    text: Any, encode: Encode, prompts: list[str], neg: list[str | None], do_cfg: bool, size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """SD3's joint sequence and pooled projections; under CFG the negatives' ("" when none was
    given: SD3 has no zeroing flag) first."""
    states, pooled = _sd3_embeddings(text, encode, prompts, "prompt")
    if do_cfg:
        s, p = _sd3_embeddings(text, encode, _texts(neg), "negative_prompt")
        states, pooled = np.concatenate([s, states]), np.concatenate([p, pooled])
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def flux(
    text: Any, encode: Encode, prompts: list[str], neg: list[str | None], do_cfg: bool, size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """FluxPipeline.encode_prompt (prompt_2 = prompt): CLIP's pooled output as the pooled
    projections, T5's states as the token sequence. No CFG batch (dev embeds its guidance, schnell
    has none): negative prompts are not used, as in diffusers without true_cfg_scale."""
    ((enc2, tok2),) = text.more
    pooled = encode(text.encoder, text.tokenizer, prompts, "prompt")["pooler_output"]
    states = encode(enc2, tok2, prompts, "prompt")["last_hidden_state"]
    return {
        "encoder_hidden_states": states.astype(np.float32),
        "pooled_projections": pooled.astype(np.float32),
    }


RECIPES = {"sd": sd, "sdxl": sdxl, "sd3": sd3, "flux": flux}
