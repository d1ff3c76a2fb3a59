"""Memory-only saves (`save_pretrained(save_base=False)`), shared the way a PEFT adapter is.

The base model lives in an offline Hugging Face cache under its own repo id (laid out by the real
cache layout of tests/test_hub.py); the memory-only save is placed in the same cache as another
repo. Loading it with HF_HUB_OFFLINE=1 loads the base from the recorded id and gives the same
scores; a base with other weights is refused.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from lm_helpers import distinct_sequences, tiny_base
from test_hub import hub_cache_from_folder, offline  # noqa: F401  (offline is a fixture)
from transformers import AutoModelForCausalLM

from resmem import MemoryFileError, ResMemForCausalLM, ResMemWrapper
from resmem.hub import MEMORY_FILE

BASE_REPO = "resmem-test-org/tiny-llama"
MEMORY_REPO = "resmem-test-org/tiny-llama-news-memory"
BASE_COMMIT = "1111111111111111111111111111111111111111"
MEMORY_COMMIT = "2222222222222222222222222222222222222222"


@pytest.fixture
def hub(tmp_path, offline):  # noqa: F811
    """(cache dir, ResMem model built on the base loaded from the cache by repo id, its memory-only save folder)."""
    cache = str(tmp_path / "cache")
    tiny_base("llama", seed=0).save_pretrained(tmp_path / "base_upload")
    hub_cache_from_folder(tmp_path / "base_upload", cache, repo_id=BASE_REPO, commit=BASE_COMMIT)
    base = AutoModelForCausalLM.from_pretrained(BASE_REPO, cache_dir=cache)
    model = ResMemWrapper.from_base(base, k=3, sigma=0.7, temperature=1.2)
    model.build_memory(distinct_sequences(3, 20), window=12, stride=8, residual_top_m=16, batch_size=4)
    model.save_pretrained(tmp_path / "memory_only", save_base=False, base_revision=BASE_COMMIT)
    return cache, model, tmp_path / "memory_only"


def _scores(model, ids):
    with torch.no_grad():
        return model(ids).scores


def test_memory_only_save_has_no_weights_and_records_the_base(hub):
    _, model, folder = hub
    names = set(os.listdir(folder))
    assert {"config.json", MEMORY_FILE, "README.md"} <= names
    assert not [n for n in names if n.startswith("model") and n.endswith((".safetensors", ".bin"))], names
    config = json.loads((folder / "config.json").read_text())
    assert config["base_weights_saved"] is False
    assert (config["base_model_id"], config["base_revision"]) == (BASE_REPO, BASE_COMMIT)


def test_memory_only_repo_loads_its_base_from_the_offline_cache(hub, tmp_path):
    cache, model, folder = hub
    hub_cache_from_folder(folder, cache, repo_id=MEMORY_REPO, commit=MEMORY_COMMIT)
    ids = distinct_sequences(2, 16, seed=5)
    for loader in (ResMemWrapper.from_pretrained, AutoModelForCausalLM.from_pretrained):
        loaded = loader(MEMORY_REPO, cache_dir=cache)
        assert isinstance(loaded, ResMemForCausalLM) and not loaded.training
        assert loaded.base.name_or_path == BASE_REPO
        assert torch.equal(_scores(loaded, ids), _scores(model, ids))
    # From the local folder too, and with the base passed in instead of loaded.
    assert torch.equal(_scores(ResMemWrapper.from_pretrained(folder, cache_dir=cache), ids), _scores(model, ids))
    same = AutoModelForCausalLM.from_pretrained(BASE_REPO, cache_dir=cache)
    assert torch.equal(_scores(ResMemWrapper.from_pretrained(folder, base_model=same), ids), _scores(model, ids))
    # Saving the loaded model memory-only again keeps the recorded base and its pinned revision.
    loaded.save_pretrained(tmp_path / "again", save_base=False)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (config["base_model_id"], config["base_revision"]) == (BASE_REPO, BASE_COMMIT)


def test_a_different_base_is_refused(hub, tmp_path):
    cache, _, folder = hub
    other = tiny_base("llama", seed=1)  # same architecture, other weights
    with pytest.raises(MemoryFileError, match=r"base_model passed to from_pretrained has .*not the base the memory was built from"):
        ResMemWrapper.from_pretrained(folder, base_model=other)
    # A save that records another repo (same architecture, other weights) is refused at load as well.
    other.save_pretrained(tmp_path / "other_upload")
    hub_cache_from_folder(tmp_path / "other_upload", cache, repo_id="resmem-test-org/other-llama", commit=BASE_COMMIT)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["base_model_id"] = "resmem-test-org/other-llama"
    config_path.write_text(json.dumps(config))
    with pytest.raises(MemoryFileError, match=r"'resmem-test-org/other-llama' \(revision 1111111111.*\) has .*Pass that exact base"):
        ResMemWrapper.from_pretrained(folder, cache_dir=cache)


def test_missing_base_names_the_fix(hub, tmp_path):
    _, _, folder = hub
    with pytest.raises(OSError, match=r"memory-only save; its base model 'resmem-test-org/tiny-llama'.*base_model=base"):
        ResMemWrapper.from_pretrained(folder, cache_dir=str(tmp_path / "empty_cache"))


def test_base_without_repo_id_needs_one(tmp_path):
    model = ResMemWrapper.from_base(tiny_base("llama", seed=0), k=3)  # built from a config: no name_or_path
    with pytest.raises(ValueError, match=r"no repo id.*base_model_id='org/name'.*save_base=True"):
        model.save_pretrained(tmp_path / "m", save_base=False)
    assert not (tmp_path / "m").exists()
    model.save_pretrained(tmp_path / "m", save_base=False, base_model_id=BASE_REPO)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["base_model_id"] == BASE_REPO


def test_full_save_after_a_memory_only_save_restores_the_weights(hub, tmp_path):
    _, model, folder = hub
    model.save_pretrained(folder)  # same folder, full save
    assert "model.safetensors" in os.listdir(folder)
    loaded = ResMemWrapper.from_pretrained(folder)
    assert loaded.config.base_weights_saved is True
    ids = distinct_sequences(1, 10, seed=6)
    assert torch.equal(_scores(loaded, ids), _scores(model, ids))
