"""Llama-3 tokenizer (HunyuanVideo's ``tokenizer/``) on the ``tokenizers`` package, without transformers.

Llama-3 ships a byte-level BPE ``tokenizer.json`` whose post-processor prepends ``<|begin_of_text|>``; chat markers
(``<|start_header_id|>``, ``<|eot_id|>``, ...) are added special tokens, so the HunyuanVideo prompt template
tokenizes into them. Padding and truncation follow transformers' fast tokenizer called with
``padding="max_length", truncation=True, max_length=...``: the same ``tokenizers`` settings (longest-first
truncation from the right, padding with the pad token to exactly ``max_length``), so ids and masks are identical.

Llama-3 itself defines no pad token; llava-llama-3-8b (HunyuanVideo's text encoder) adds ``<pad>``. The pad token
and the padding side come from ``special_tokens_map.json`` / ``tokenizer_config.json`` next to ``tokenizer.json``;
HunyuanVideo's pipeline pads on the right (its template crop relies on it), which is also the default here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from models.text_encoders.tokenizers import BaseTokenizer, TokenizedBatch

SIDES = ("right", "left")


class LlamaTokenizer(BaseTokenizer):
    """A ``tokenizers.Tokenizer`` producing fixed-length ids and masks; the length is chosen per call."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        pad_token: str,
        *,
        padding_side: str = "right",
        truncation_side: str = "right",
    ):
        """Wraps a tokenizer.

        Args:
            tokenizer: Tokenizer whose post-processor adds the model's special tokens (``<|begin_of_text|>``).
            pad_token: Padding token; must be in the vocabulary.
            padding_side: 'right' (HunyuanVideo) or 'left'.
            truncation_side: 'right' (transformers' default) or 'left'.

        Raises:
            ValueError: For a pad token missing from the vocabulary or an unknown side.
        """
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in SIDES:
                raise ValueError(f"{name} must be one of {SIDES}, got {side!r}")
        super().__init__(tokenizer, pad_token)
        self.padding_side = padding_side
        self.truncation_side = truncation_side

    def num_tokens(self, text: str) -> int:
        """Tokens of ``text`` with the special tokens the post-processor adds, without padding or truncation.

        ``num_tokens(template.split("{}")[0])`` is a template's ``crop_start`` when the prompt starts a new
        pre-token (true after the ``\\n\\n`` of the Llama-3 chat header).
        """
        self._tok.no_truncation()
        self._tok.no_padding()
        return len(self._tok.encode(text).ids)

    def __call__(self, prompts: str | Sequence[str], max_length: int) -> TokenizedBatch:
        """Tokenizes prompts to ``[B, max_length]``.

        Args:
            prompts: One prompt or a non-empty sequence of prompts.
            max_length: Output length; longer prompts are truncated (the beginning-of-text token is kept).

        Returns:
            int32 ``input_ids`` and ``attention_mask`` (1 for real tokens, specials included; 0 for padding).

        Raises:
            ValueError: For an empty sequence or a non-positive ``max_length``; TypeError for a non-string element.
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        prompts = self._prompt_list(prompts)
        self._tok.enable_truncation(
            max_length=max_length, stride=0, strategy="longest_first", direction=self.truncation_side
        )
        self._tok.enable_padding(
            length=max_length, direction=self.padding_side, pad_id=self.pad_id, pad_type_id=0, pad_token=self.pad_token
        )
        return self._encode(prompts)


def _token_setting(directory: Path, name: str) -> str | None:
    """``name`` from special_tokens_map.json, else tokenizer_config.json (string or {"content": ...})."""
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / fname
        if path.exists():
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
    return None


def load_llama_tokenizer(
    path: str | os.PathLike, *, pad_token: str | None = None, padding_side: str | None = None
) -> LlamaTokenizer:
    """Loads a Llama-3 tokenizer from ``tokenizer.json``.

    Args:
        path: A ``tokenizer.json`` file, a tokenizer directory, or a HunyuanVideo diffusers directory (its
            ``tokenizer/`` is used).
        pad_token: Overrides the pad token of special_tokens_map.json / tokenizer_config.json.
        padding_side: Overrides tokenizer_config.json's ``padding_side`` (default 'right'); the truncation side
            is that file's ``truncation_side`` (default 'right').

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: When no ``tokenizer.json`` is found.
        ValueError: When no pad token is configured (Llama-3 has none; llava adds ``<pad>``).
    """
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").exists() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(
            f"Llama tokenizer needs {str(file)!r}, which does not exist (tokenizer.model / tiktoken files are not read)"
        )
    directory = file.parent
    pad = pad_token if pad_token is not None else _token_setting(directory, "pad_token")
    if pad is None:
        raise ValueError(
            f"{directory} configures no pad token (special_tokens_map.json / tokenizer_config.json); pass "
            "pad_token=... (llava-llama-3 uses '<pad>')"
        )
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    side = padding_side if padding_side is not None else cfg.get("padding_side", "right")
    return LlamaTokenizer(
        tokenizers.Tokenizer.from_file(str(file)),
        pad,
        padding_side=side,
        truncation_side=cfg.get("truncation_side", "right"),
    )
