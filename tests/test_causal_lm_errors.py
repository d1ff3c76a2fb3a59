"""Bad input for ResMemForCausalLM: every user-facing error names the problem (and the fix)."""

import logging
import shutil

import pytest
import torch
import transformers as tf
from lm_helpers import VOCAB, distinct_sequences, tiny_base, tiny_config, word_tokenizer
from transformers import AutoModelForCausalLM

import resmem  # noqa: F401  registers the Auto classes
from resmem import MemoryFileError, ResMemWrapper


@pytest.fixture(scope="module")
def model():
    m = ResMemWrapper.from_base(tiny_base("llama"), k=2, sigma=1.0)
    m.build_memory(distinct_sequences(2, 16), window=12, stride=8)
    return m


def test_tokenizer_vocabulary_larger_than_model():
    m = ResMemWrapper.from_base(tiny_base("llama"))
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        m.build_memory(["w1 w2 w3"], tokenizer=word_tokenizer(VOCAB + 50), window=12, stride=8)


def test_token_ids_outside_vocabulary():
    m = ResMemWrapper.from_base(tiny_base("llama"))
    with pytest.raises(ValueError, match="outside \\[0, 128\\)"):
        m.build_memory([[1, 2, VOCAB + 5]], window=12, stride=8)


def test_memory_built_with_another_tokenizer(tmp_path):
    m = ResMemWrapper.from_base(tiny_base("llama"))
    tok = word_tokenizer(100)
    m.build_memory(["w1 w2 w3 w4", "w7 w8 w9"], tokenizer=tok, window=12, stride=8)
    other = word_tokenizer(100, shift=1)
    with pytest.raises(ValueError, match="another tokenizer"):
        m.check_tokenizer(other)
    m.save_pretrained(tmp_path / "saved")
    AutoModelForCausalLM.from_pretrained(tmp_path / "saved", tokenizer=tok)  # the right one loads
    with pytest.raises(ValueError, match="another tokenizer"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved", tokenizer=other)


def test_memory_built_for_another_base(model, tmp_path):
    model.save_pretrained(tmp_path / "a")
    ResMemWrapper.from_base(tiny_base("llama", seed=1)).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(MemoryFileError, match="fingerprint"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_image_memory_file_is_not_a_token_memory(tmp_path):
    from resmem import ResidualMemory
    from resmem.memory_lm import TokenResidualMemory

    mem = ResidualMemory()
    mem.set_entries(torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2), fingerprint="x", layer="l")
    mem.save(str(tmp_path / "m.safetensors"))
    with pytest.raises(MemoryFileError, match="not a causal-LM ResMem memory"):
        TokenResidualMemory().load(str(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("top_m", [0, -3, VOCAB + 1, 2.5])
def test_residual_top_m_out_of_range(top_m):
    m = ResMemWrapper.from_base(tiny_base("llama"))
    with pytest.raises(ValueError, match="residual_top_m must be an integer in \\[1, 128\\]"):
        m.build_memory([[1, 2, 3]], residual_top_m=top_m, window=12, stride=8)


def test_short_texts_skipped_with_count(caplog):
    m = ResMemWrapper.from_base(tiny_base("llama"))
    with caplog.at_level(logging.WARNING):
        m.build_memory([[5], [], [1, 2, 3]], window=12, stride=8)
    assert len(m.memory) == 2 and m.memory_stats["skipped"] == 2
    assert "skipped 2 text(s) shorter than 2 tokens" in caplog.text
    with pytest.raises(ValueError, match="every text is shorter than 2 tokens \\(2 skipped\\)"):
        m.build_memory([[5], []], window=12, stride=8)
    assert len(m.memory) == 2  # the failed build left the previous memory in place


@pytest.mark.parametrize(
    "window, stride, message",
    [(8, 8, "must be larger than stride"), (8, 12, "must be larger than stride"), (65, 16, "maximum positions \\(64\\)")],
)
def test_bad_window(window, stride, message):
    m = ResMemWrapper.from_base(tiny_base("llama"))
    with pytest.raises(ValueError, match=message):
        m.build_memory([[1, 2, 3]], window=window, stride=stride)


def test_missing_pad_token_when_padding_is_needed():
    config = tiny_config("llama")
    config.eos_token_id = config.pad_token_id = None
    m = ResMemWrapper.from_base(tf.AutoModelForCausalLM.from_config(config))
    with pytest.raises(ValueError, match="no pad token: set `tokenizer.pad_token = tokenizer.eos_token`"):
        m.build_memory([[1, 2, 3, 4], [5, 6]], batch_size=2, window=12, stride=8)
    m.build_memory([[1, 2, 3, 4], [5, 6]], batch_size=2, window=12, stride=8, pad_token_id=0)  # the fix works
    m.build_memory([[1, 2, 3, 4], [5, 6]], batch_size=1, window=12, stride=8)  # no padding needed: no pad token needed
    assert len(m.memory) == 4


def test_generate_before_build_memory():
    m = ResMemWrapper.from_base(tiny_base("gpt2"))
    with pytest.raises(ValueError, match="memory is empty: call `model.build_memory"):
        m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2)


def test_temperature_changed_after_build(model):
    model.config.residual_temperature = 2.0
    try:
        with pytest.raises(ValueError, match="computed at temperature T=1.0.*build_memory"):
            model(torch.tensor([[3, 4, 5]]))
    finally:
        model.config.residual_temperature = 1.0


def test_bad_distribution_and_lambda():
    with pytest.raises(ValueError, match="distribution must be one of"):
        resmem.ResMemConfig(base_config=tiny_config("llama"), task="causal-lm", distribution="softmax")
    with pytest.raises(ValueError, match="mixture_lambda must lie in \\[0, 1\\]"):
        resmem.ResMemConfig(base_config=tiny_config("llama"), task="causal-lm", mixture_lambda=1.5)


def test_text_without_tokenizer():
    m = ResMemWrapper.from_base(tiny_base("llama"))
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        m.build_memory(["some text"], window=12, stride=8)
