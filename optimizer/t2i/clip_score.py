"""CLIP score for user pipelines (`--clip-model DIR`, a local transformers CLIPModel folder).

CLIP score = 100 x mean cosine(image embedding, text embedding), clipped at 0 (Hessel et al.
2021, as torchmetrics computes it). Images are resized to the model's image size, normalized with
CLIP's mean/std; no processor download is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipJudge:
    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPTokenizerFast

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise InputError(f"--clip-model {folder}: no config.json (a transformers CLIPModel folder)")
        try:
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
            self.tokenizer = CLIPTokenizerFast.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise InputError(f"--clip-model {folder}: not loadable ({str(e)[:200]})") from None
        self.size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> L2-normalized image embeddings [N, D]."""
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(
            x, size=(self.size, self.size), mode="bicubic", align_corners=False
        )
        x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        f = self.model.get_image_features(pixel_values=x)
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
        return torch.nn.functional.normalize(f, dim=-1).numpy()

    @torch.no_grad()
    def score(self, image_features: np.ndarray, prompts: list[str]) -> float:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        t = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        t = torch.nn.functional.normalize(t, dim=-1).numpy()
        cos = (image_features * t).sum(-1)
        return float(100.0 * np.clip(cos, 0, None).mean())
