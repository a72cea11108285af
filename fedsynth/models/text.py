"""Text conditioning: a tokenizer and a text encoder that turn prompts into cross-attention context.

Nothing can be downloaded at run time, and a federation cannot agree on a vocabulary without
sharing words from every site's data, so the default tokenizer needs no vocabulary file: each
lower-cased word is hashed (CRC32) into ``vocab_size`` buckets. The same prompt gives the same
ids on every host. The text encoder (token + position embeddings, MONAI transformer blocks,
layer norm) is trained jointly with the diffusion UNet as its own parameter group
(``text_encoder``), shared in federations like the UNet.

A site that has a pretrained encoder on disk (a Hugging Face folder, e.g. a CLIP text model) can
plug it in with ``text.encoder: pretrained`` and ``text.pretrained_dir``; it is loaded with
``local_files_only=True`` and kept frozen.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from monai.networks.blocks import TransformerBlock
from torch import nn

from fedsynth.errors import ConfigError

if TYPE_CHECKING:
    from fedsynth.config import TextConfig

PAD = 0
BEGIN = 1
_WORD = re.compile(r"[a-z0-9]+")


class HashTokenizer:
    """Words -> ids by hashing: ``[BEGIN, w1, ..., wk, PAD, ...]`` of length ``max_tokens``.

    The empty prompt is ``[BEGIN, PAD, ...]``: the "no description" input that classifier-free
    guidance contrasts with.
    """

    def __init__(self, vocab_size: int, max_tokens: int) -> None:
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens

    def word_id(self, word: str) -> int:
        return 2 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 2)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(N, max_tokens)`` and the mask of real tokens (1) vs padding (0)."""
        ids = torch.full((len(prompts), self.max_tokens), PAD, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = [BEGIN] + [self.word_id(w) for w in _WORD.findall(prompt.lower())]
            words = words[: self.max_tokens]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, (ids != PAD).long()


class TransformerTextEncoder(nn.Module):
    """A small transformer over hashed word ids; output ``(N, max_tokens, width)`` for cross-attention."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.tokenizer = HashTokenizer(cfg.vocab_size, cfg.max_tokens)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_tokens, cfg.width)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, mlp_dim=4 * cfg.width, num_heads=cfg.heads, qkv_bias=True)
            for _ in range(cfg.layers)
        )
        for block in self.blocks:
            block.norm_cross_attn = nn.Identity()  # unused without cross-attention; a parameter-free stand-in
        self.norm = nn.LayerNorm(cfg.width)
        self.width = cfg.width

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return self.norm(x)

    def encode(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts)
        return self(ids.to(device), mask.to(device))


class PretrainedTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder read from a local folder (never downloaded)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ConfigError("text.encoder: pretrained needs the 'transformers' package (pip install transformers)") from None
        if not cfg.pretrained_dir:
            raise ConfigError("text.encoder: pretrained needs text.pretrained_dir (a local model folder)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained_dir, local_files_only=True)
            model = AutoModel.from_pretrained(cfg.pretrained_dir, local_files_only=True)
        except OSError as err:
            raise ConfigError(f"text.pretrained_dir {cfg.pretrained_dir}: cannot load a text model there: {err}") from None
        self.model = getattr(model, "text_model", model)
        self.max_tokens = cfg.max_tokens
        self.width = int(self.model.config.hidden_size)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def encode(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        with torch.no_grad():
            return self.model(input_ids=tokens["input_ids"].to(device),
                              attention_mask=tokens["attention_mask"].to(device)).last_hidden_state


def build_text_encoder(cfg: TextConfig) -> TransformerTextEncoder | PretrainedTextEncoder:
    """The text encoder a config asks for."""
    if cfg.encoder == "pretrained":
        return PretrainedTextEncoder(cfg)
    return TransformerTextEncoder(cfg)
