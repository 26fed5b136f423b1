"""Tokenizers: tiny T5 (Unigram tokenizer.json) and CLIP (vocab.json + merges.txt) files built here, checked
against transformers' tokenizers on the same files, plus padding/truncation and error messages."""

import json

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from models.text_encoders.tokenizers import TextTokenizer, clip_bpe_tokenizer, load_clip_tokenizer, load_t5_tokenizer
from tests.models.helpers import clip_tokenizer_files

PROMPTS = [
    "a photo of a cat",
    "A  Photo OF a   dog, sitting!",
    "cats and 42 dogs",
    "",
    "the cat sat on the mat " * 6,
]


@pytest.fixture
def t5_dir(tmp_path):
    pieces = ["<pad>", "</s>", "<unk>", "▁a", "▁photo", "▁of", "▁cat", "▁dog", "s", "▁the", "▁sat", "▁on", "▁mat", "▁"]
    pieces += list("abcdefghijklmnopqrstuvwxyz,!0123456789")
    vocab = [(p, 0.0 if i < 3 else -1.0 - 0.1 * i) for i, p in enumerate(pieces)]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_t5_matches_transformers(t5_dir):
    ours = load_t5_tokenizer(str(t5_dir), max_length=12)
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(t5_dir / "tokenizer.json"), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    expected = ref(PROMPTS, padding="max_length", truncation=True, max_length=12, return_tensors="np")
    batch = ours(PROMPTS)
    assert batch.input_ids.dtype == np.int32 and batch.input_ids.shape == (5, 12)
    np.testing.assert_array_equal(batch.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, expected["attention_mask"])
    # Truncation keeps the closing </s>; padding uses <pad> = 0.
    assert batch.input_ids[4, -1] == 1 and batch.attention_mask[4].all()
    assert batch.input_ids[3].tolist() == [1] + [0] * 11
    assert ours.decode(batch.input_ids[0]) == "a photo of a cat"


def test_clip_vocab_merges_match_transformers(tmp_path):
    vocab = clip_tokenizer_files(tmp_path)
    ours = load_clip_tokenizer(str(tmp_path), max_length=16)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    prompts = [*PROMPTS, "Ünïcode café ... ok", "don't stop"]
    expected = ref(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    batch = ours(prompts)
    np.testing.assert_array_equal(batch.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, expected["attention_mask"])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert batch.input_ids[0, :4].tolist() == [bos, vocab["a</w>"], vocab["p"], vocab["h"]]
    assert batch.input_ids[4, -1] == eos and batch.input_ids[3].tolist() == [bos] + [eos] * 15
    assert ours.decode(batch.input_ids[2]) == "cats and 4 2 dogs"


def test_clip_tokenizer_json_round_trip(tmp_path):
    files = tmp_path / "bpe"
    files.mkdir()
    clip_tokenizer_files(files)
    built = clip_bpe_tokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    saved = tmp_path / "json"
    saved.mkdir()
    built.save(str(saved / "tokenizer.json"))
    (saved / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    from_json = load_clip_tokenizer(str(saved), max_length=77)
    from_files = load_clip_tokenizer(str(files), max_length=77)
    a, b = from_json(PROMPTS), from_files(PROMPTS)
    assert a.input_ids.shape == (5, 77)
    pad = from_json.pad_id
    assert from_json.pad_token == "!" and pad != from_files.pad_id
    np.testing.assert_array_equal(
        np.where(a.attention_mask == 1, a.input_ids, -1), np.where(b.attention_mask == 1, b.input_ids, -1)
    )
    assert (a.input_ids[a.attention_mask == 0] == pad).all()


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_t5_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_t5_tokenizer(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="spiece.model is present"):
        load_t5_tokenizer(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_clip_tokenizer(str(tmp_path))


def test_bad_prompts(t5_dir):
    tok = load_t5_tokenizer(str(t5_dir), max_length=8)
    with pytest.raises(ValueError, match="at least one"):
        tok([])
    with pytest.raises(TypeError, match="must be strings"):
        tok(["ok", 3])
    assert tok("a cat").input_ids.shape == (1, 8)


def test_bad_construction(t5_dir):
    raw = tokenizers.Tokenizer.from_file(str(t5_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="max_length"):
        TextTokenizer(raw, 0, "<pad>")
    with pytest.raises(ValueError, match="not in the tokenizer vocabulary"):
        TextTokenizer(raw, 8, "<nope>")
