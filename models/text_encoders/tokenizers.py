"""Tokenizers for the Flux text encoders, built on the ``tokenizers`` package (no transformers at run time).

* T5: ``tokenizer.json`` (shipped in FLUX.1 ``tokenizer_2/``). A directory with only ``spiece.model`` is refused
  with an error that says so: reading SentencePiece protobufs needs the ``sentencepiece`` package, which the project
  does not depend on.
* CLIP: ``tokenizer.json`` when present, else ``vocab.json`` + ``merges.txt`` (what FLUX.1 ``tokenizer/`` ships),
  assembled into the CLIP byte-level BPE pipeline: NFC, whitespace collapsing, lower-casing, CLIP's word regex,
  byte-level alphabet, ``</w>`` end-of-word suffix, ``<|startoftext|> ... <|endoftext|>`` framing.

Every prompt is truncated and padded to a fixed ``max_length`` (T5: 512 for FLUX.1-dev, 256 for schnell; CLIP: 77),
so the encoders see static shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

T5_MAX_LENGTH_DEV = 512
T5_MAX_LENGTH_SCHNELL = 256
CLIP_MAX_LENGTH = 77

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
# CLIP's word splitter: contractions, letter runs, single digits, runs of other non-space characters.
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
    """Fixed-length token ids.

    Attributes:
        input_ids: int32 [B, max_length].
        attention_mask: int32 [B, max_length], 1 for real tokens (special tokens included), 0 for padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray


class BaseTokenizer:
    """What the fixed-length tokenizers (``TextTokenizer`` here, ``llama_tokenizer.LlamaTokenizer``) share: the pad
    token check, prompt validation, batch encoding into int32 arrays, vocabulary size and decoding."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str):
        """Wraps ``tokenizer``; raises ValueError when ``pad_token`` is missing from its vocabulary."""
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer vocabulary")
        self._tok = tokenizer
        self.pad_token = pad_token
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
        """One prompt or a sequence of them as a non-empty list of strings (ValueError / TypeError otherwise)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must contain at least one string, got an empty sequence")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got elements of type {sorted(set(bad))}")
        return prompts

    def _encode(self, prompts: list[str]) -> TokenizedBatch:
        """The ids and masks of ``prompts`` with the tokenizer's current truncation and padding settings."""
        encodings = self._tok.encode_batch(prompts)
        return TokenizedBatch(
            input_ids=np.asarray([e.ids for e in encodings], np.int32),
            attention_mask=np.asarray([e.attention_mask for e in encodings], np.int32),
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special and padding tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class TextTokenizer(BaseTokenizer):
    """A ``tokenizers.Tokenizer`` with fixed-length truncation and padding."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int, pad_token: str):
        """Wraps a tokenizer.

        Args:
            tokenizer: Tokenizer whose post-processor adds the model's special tokens.
            max_length: Output length; longer prompts are truncated (special tokens are kept).
            pad_token: Token used for padding; must be in the vocabulary.

        Raises:
            ValueError: For a non-positive ``max_length`` or a pad token missing from the vocabulary.
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        super().__init__(tokenizer, pad_token)
        self.max_length = max_length
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedBatch:
        """Tokenizes prompts to ``[B, max_length]``.

        Args:
            prompts: One prompt or a non-empty sequence of prompts.

        Returns:
            The ids and attention mask.

        Raises:
            ValueError: For an empty sequence; TypeError for a non-string element.
        """
        return self._encode(self._prompt_list(prompts))


def _special_token(directory: str, name: str, default: str) -> str:
    """``name`` from special_tokens_map.json (string or {"content": ...}), else ``default``."""
    path = os.path.join(directory, "special_tokens_map.json")
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        value = json.load(f).get(name, default)
    return value["content"] if isinstance(value, dict) else value


def _require_dir(directory: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")


def load_t5_tokenizer(directory: str, max_length: int = T5_MAX_LENGTH_DEV) -> TextTokenizer:
    """Loads the T5 tokenizer from ``directory/tokenizer.json``.

    Args:
        directory: Checkpoint folder (FLUX.1 ``tokenizer_2``).
        max_length: 512 for FLUX.1-dev, 256 for FLUX.1-schnell.

    Returns:
        Tokenizer padding with ``<pad>`` and ending every prompt in ``</s>``.

    Raises:
        FileNotFoundError: Naming ``tokenizer.json`` when it is absent.
    """
    _require_dir(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        hint = ""
        if os.path.exists(os.path.join(directory, "spiece.model")):
            hint = (
                "; spiece.model is present but SentencePiece models are not read directly (the sentencepiece "
                "package is not a dependency): export tokenizer.json with transformers' T5TokenizerFast once"
            )
        raise FileNotFoundError(f"T5 tokenizer needs {path!r}, which does not exist{hint}")
    tok = tokenizers.Tokenizer.from_file(path)
    return TextTokenizer(tok, max_length, _special_token(directory, "pad_token", "<pad>"))


def clip_bpe_tokenizer(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
    """Assembles CLIP's byte-level BPE tokenizer from ``vocab.json`` and ``merges.txt``.

    Args:
        vocab_path: JSON token -> id map.
        merges_path: BPE merges, one ``a b`` pair per line (a ``#version`` header line is skipped).

    Returns:
        A tokenizer framing each prompt as ``<|startoftext|> ... <|endoftext|>``.
    """
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
    missing = [t for t in (_CLIP_BOS, _CLIP_EOS) if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_path!r} lacks the CLIP special tokens {missing}")
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token=_CLIP_EOS,
            fuse_unk=False,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("</w>", " "), decoders.ByteLevel(), decoders.Strip(" ", 0, 1)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_CLIP_BOS} $A {_CLIP_EOS}",
        special_tokens=[(_CLIP_BOS, vocab[_CLIP_BOS]), (_CLIP_EOS, vocab[_CLIP_EOS])],
    )
    tok.add_special_tokens([_CLIP_BOS, _CLIP_EOS])
    return tok


def load_clip_tokenizer(directory: str, max_length: int = CLIP_MAX_LENGTH) -> TextTokenizer:
    """Loads the CLIP tokenizer from ``tokenizer.json`` or from ``vocab.json`` + ``merges.txt``.

    Args:
        directory: Checkpoint folder (FLUX.1 ``tokenizer``).
        max_length: 77 for CLIP.

    Returns:
        Tokenizer padding with the ``pad_token`` of special_tokens_map.json (``<|endoftext|>`` by default).

    Raises:
        FileNotFoundError: Naming the missing files when neither form is complete.
    """
    _require_dir(directory)
    json_path = os.path.join(directory, "tokenizer.json")
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    if os.path.exists(json_path):
        tok = tokenizers.Tokenizer.from_file(json_path)
    elif os.path.exists(vocab_path) and os.path.exists(merges_path):
        tok = clip_bpe_tokenizer(vocab_path, merges_path)
    else:
        absent = [p for p in (vocab_path, merges_path) if not os.path.exists(p)]
        raise FileNotFoundError(f"CLIP tokenizer needs {json_path!r} or vocab.json + merges.txt; missing {absent}")
    return TextTokenizer(tok, max_length, _special_token(directory, "pad_token", _CLIP_EOS))
