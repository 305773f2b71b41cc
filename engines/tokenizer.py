"""CLIP tokenization with the `tokenizers` package from a tokenizer.json (no transformers, no torch).

Matches diffusers' encode_prompt: `tokenizer(prompt, padding="max_length", max_length=
model_max_length, truncation=True)`: [BOS, tokens..., EOS] cut to model_max_length (EOS kept),
then padded with the pad token. A truncated prompt is logged, as diffusers warns. `chunked` is the
opt-in long-prompt encoding (A1111 / compel): model_max_length - 2 tokens per chunk, each with its
own BOS and EOS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engines.errors import BackendUnavailable, InputError

log = logging.getLogger(__name__)


class ClipTokenizer:
    def __init__(self, path: str | Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendUnavailable(
                "the tokenizers package is not installed: pip install tokenizers"
            ) from None
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: tokenizer.json not found")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise InputError(f"{path}: not a valid tokenizer.json ({e})") from None
        pad_id = self._tok.token_to_id(pad_token)
        if pad_id is None:
            raise InputError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
        self.model_max_length, self.pad_token, self.pad_id = model_max_length, pad_token, pad_id
        self._tok.no_padding()
        self._tok.no_truncation()

    def __call__(self, prompts: list[str], *, truncate: bool = True, what: str = "prompt") -> np.ndarray:
        """int64 [len(prompts), model_max_length] input ids; with truncate=False a prompt over
        the limit is an InputError (the first such prompt, with its token count)."""
        n = self.model_max_length
        ids = np.full((len(prompts), n), self.pad_id, dtype=np.int64)
        for i, enc in enumerate(self._tok.encode_batch(prompts)):
            toks = enc.ids
            if len(toks) > n and not truncate:
                raise InputError(
                    f"{what} {i}: {len(toks)} tokens (with BOS and EOS), over the limit of {n}; "
                    "shorten it (long prompts are refused here, not truncated)"
                )
            if len(toks) > n:  # keep BOS + the first n-2 tokens + EOS, as truncation=True does
                log.warning("prompt %d truncated to %d tokens (CLIP's limit): %r", i, n, prompts[i][:80])
                toks = [*toks[: n - 1], toks[-1]]
            ids[i, : len(toks)] = toks
        return ids

    def chunks_needed(self, prompts: list[str]) -> list[int]:
        """Per prompt, the chunks of model_max_length - 2 tokens its text (without BOS and EOS)
        fills; at least 1 (an empty prompt is one [BOS, EOS, pad...] chunk)."""
        n = self.model_max_length - 2
        return [max(1, -(-(len(e.ids) - 2) // n)) for e in self._tok.encode_batch(prompts)]

    def chunked(self, prompts: list[str], chunks: int, *, what: str = "prompt") -> np.ndarray:
        """int64 [len(prompts), chunks, model_max_length]: each prompt's tokens without BOS and EOS
        cut into pieces of model_max_length - 2, each piece [BOS, piece, EOS] padded with the pad
        token; a prompt that needs fewer chunks gets empty ones ([BOS, EOS, pad...]) after its own,
        as A1111 and compel pad. A prompt within the limit gives, in its one chunk, `self(prompts)`'s
        row exactly; one needing more than `chunks` is an InputError."""
        n = self.model_max_length
        ids = np.full((len(prompts), chunks, n), self.pad_id, dtype=np.int64)
        for i, enc in enumerate(self._tok.encode_batch(prompts)):
            bos, inner, eos = enc.ids[0], enc.ids[1:-1], enc.ids[-1]
            pieces = [inner[j : j + n - 2] for j in range(0, len(inner), n - 2)] or [[]]
            if len(pieces) > chunks:
                raise InputError(f"{what} {i}: {len(pieces)} chunks of {n - 2} tokens, over {chunks}")
            for j in range(chunks):
                row = [bos, *(pieces[j] if j < len(pieces) else []), eos]
                ids[i, j, : len(row)] = row
        return ids
