"""ResMem's T is the config field `residual_temperature` (formerly `temperature`): old configs still load,
and it never becomes (or is mistaken for) the sampling temperature of `generate()`."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import make_base, make_pixel_dataset
from lm_helpers import distinct_sequences, tiny_base
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import resmem  # noqa: F401  registers the Auto classes
from resmem import ResMemConfig, ResMemWrapper


def _write_old_name(folder, value=1.3) -> None:
    """Rewrite `folder/config.json` as resmem-hf wrote it before the rename."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        data = json.load(f)
    data.pop("residual_temperature", None)
    data["temperature"] = value
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


@pytest.fixture
def fresh_warnings():
    hf_logging.warning_once.cache_clear()  # warning_once remembers messages across tests
    yield
    hf_logging.warning_once.cache_clear()


def test_config_json_with_the_old_name_loads(tmp_path, caplog, fresh_warnings):
    ResMemConfig(k=7).save_pretrained(tmp_path)
    _write_old_name(tmp_path, 1.3)
    with caplog.at_level(logging.WARNING):
        config = ResMemConfig.from_pretrained(tmp_path)
        ResMemConfig.from_pretrained(tmp_path)
    assert config.residual_temperature == 1.3 and config.k == 7
    assert caplog.text.count("former name of `residual_temperature`") == 1  # once per process
    assert "temperature" not in config.to_dict()  # saved again under the new name only
    config.save_pretrained(tmp_path / "again")
    with open(tmp_path / "again" / "config.json") as f:
        assert json.load(f)["residual_temperature"] == 1.3


def test_saved_model_with_the_old_name_loads_with_the_same_scores(tmp_path, query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=4, sigma=0.8, residual_temperature=1.3)
    model.build_memory(make_pixel_dataset(30, seed=0), batch_size=16)
    model.save_pretrained(tmp_path / "m")
    _write_old_name(tmp_path / "m", 1.3)
    loaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert loaded.config.residual_temperature == 1.3
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=query_pixels).scores, model(pixel_values=query_pixels).scores)


def test_both_names_with_different_values_are_refused():
    with pytest.raises(ValueError, match="pass only `residual_temperature`"):
        ResMemConfig(temperature=1.3, residual_temperature=2.0)


def test_from_base_accepts_both_argument_names():
    base = make_base("resnet")
    assert ResMemWrapper.from_base(base, temperature=1.4).config.residual_temperature == 1.4
    assert ResMemWrapper.from_base(base, residual_temperature=1.4).config.residual_temperature == 1.4
    assert ResMemWrapper.from_base(base).config.residual_temperature == 1.0
    assert "temperature" not in ResMemWrapper.from_base(base, temperature=1.4).config.to_dict()
    with pytest.raises(ValueError, match="same argument"):
        ResMemWrapper.from_base(base, temperature=1.4, residual_temperature=2.0)


def test_setting_the_old_name_on_the_config_names_the_fix():
    model = ResMemWrapper.from_base(make_base("resnet"), temperature=1.4)
    with pytest.raises(AttributeError, match=r"config\.residual_temperature.*generation_config\.temperature"):
        model.config.temperature = 2.0
    assert model.config.residual_temperature == 1.4


def _sampling_temperature_used(model, prompt) -> torch.Tensor:
    """Ratios raw logits / processed scores of sampled steps: the temperature `generate` divided by."""
    torch.manual_seed(0)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=True, top_k=0,
                         top_p=1.0, output_scores=True, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    logits, scores = torch.stack(out.logits), torch.stack(out.scores)  # (steps, B, V)
    finite = torch.isfinite(logits) & (scores.abs() > 1e-3)
    return logits[finite] / scores[finite]


def test_generate_samples_with_the_base_temperature_not_resmems(tmp_path):
    base = tiny_base("llama")
    base.generation_config.do_sample, base.generation_config.temperature = True, 0.7  # the base's sampling settings
    model = ResMemWrapper.from_base(base, k=3, sigma=1.0, temperature=1.3)
    model.build_memory(distinct_sequences(4, 24), window=12, stride=8)
    prompt = distinct_sequences(2, 5, seed=7)
    assert model.generation_config.temperature == 0.7
    ratios = _sampling_temperature_used(model, prompt)
    assert ratios.numel() > 0 and torch.allclose(ratios, torch.full_like(ratios, 0.7), rtol=1e-4)
    model.save_pretrained(tmp_path / "m")
    _write_old_name(tmp_path / "m", 1.3)  # an old save: its ResMem T must not leak into sampling either
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.residual_temperature == 1.3 and loaded.generation_config.temperature == 0.7
    ratios = _sampling_temperature_used(loaded, prompt)
    assert torch.allclose(ratios, torch.full_like(ratios, 0.7), rtol=1e-4)
