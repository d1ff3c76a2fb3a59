"""save_pretrained / from_pretrained: identical scores, safe overwrites, fingerprint and file checks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import make_base, make_pixel_dataset
from transformers import AutoModelForImageClassification

from resmem import MemoryFileError, ResMemForImageClassification, ResMemWrapper, ResidualMemory
from resmem.hub import MEMORY_FILE

LOADERS = {
    "ResMemWrapper": ResMemWrapper.from_pretrained,
    "ResMemForImageClassification": ResMemForImageClassification.from_pretrained,
    "AutoModelForImageClassification": AutoModelForImageClassification.from_pretrained,
}


def _forward(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values)


def _built(arch="resnet", seed=0, k=4, sigma=0.8, temperature=1.3, n=40):
    model = ResMemWrapper.from_base(make_base(arch, seed=seed), k=k, sigma=sigma, temperature=temperature)
    model.build_memory(make_pixel_dataset(n, seed=seed), batch_size=16)
    return model


def _folder_bytes(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("arch", ["resnet", "vit", "handwritten"])
def test_roundtrip_gives_identical_scores(tmp_path, query_pixels, arch):
    model = _built(arch, k=4, sigma=0.8, temperature=1.3)
    before = _forward(model, query_pixels)
    model.save_pretrained(tmp_path / "saved")
    for loader_name, loader in LOADERS.items():
        loaded = loader(tmp_path / "saved")
        assert type(loaded) is ResMemForImageClassification, loader_name
        assert (loaded.config.k, loaded.config.sigma, loaded.config.residual_temperature) == (4, 0.8, 1.3)
        assert loaded.config.layer == model.config.layer
        assert len(loaded.memory) == len(model.memory) == 40
        for name in ("keys", "base_logits", "labels", "example_ids"):
            assert torch.equal(getattr(loaded.memory, name), getattr(model.memory, name)), (loader_name, name)
        after = _forward(loaded, query_pixels)
        for field in ("scores", "logits", "base_logits", "residual"):
            assert torch.equal(getattr(after, field), getattr(before, field)), (loader_name, field)


def test_saved_folder_has_no_pickle(tmp_path):
    _built().save_pretrained(tmp_path / "saved")
    names = set(os.listdir(tmp_path / "saved"))
    assert {"config.json", "model.safetensors", MEMORY_FILE} <= names
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth", ".joblib", ".npy"))]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".resmem-save-")]  # staging folder cleaned up


def test_changed_hyperparameters_are_saved(tmp_path):
    model = _built()
    model.config.k, model.config.sigma, model.config.residual_temperature = 9, 0.25, 2.0
    model.save_pretrained(tmp_path / "saved")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    assert (loaded.config.k, loaded.config.sigma, loaded.config.residual_temperature) == (9, 0.25, 2.0)


def test_failed_save_leaves_earlier_save_intact(tmp_path, monkeypatch, query_pixels):
    folder = tmp_path / "saved"
    first = _built(seed=0)
    expected = _forward(first, query_pixels).scores
    first.save_pretrained(folder)
    snapshot = _folder_bytes(folder)

    second = _built(seed=1, k=7, n=30)  # other weights, other memory, other config

    def failing_save(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial memory file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ResidualMemory, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        second.save_pretrained(folder)
    monkeypatch.undo()

    assert _folder_bytes(folder) == snapshot
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".resmem-save-")]
    loaded = ResMemWrapper.from_pretrained(folder)
    assert loaded.config.k == 4 and len(loaded.memory) == 40
    assert torch.equal(_forward(loaded, query_pixels).scores, expected)


def test_second_save_replaces_the_first(tmp_path, query_pixels):
    folder = tmp_path / "saved"
    _built(seed=0).save_pretrained(folder)
    second = _built(seed=1, k=7, n=30)
    second.save_pretrained(folder)
    loaded = ResMemWrapper.from_pretrained(folder)
    assert loaded.config.k == 7 and len(loaded.memory) == 30
    assert torch.equal(_forward(loaded, query_pixels).scores, _forward(second, query_pixels).scores)


# ------------------------------------------------------------------ fingerprints
@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """Folder `a` with its memory but the base weights of another save `b` (same architecture). Read-only."""
    root = tmp_path_factory.mktemp("mismatched")
    a, b = _built(seed=0), _built(seed=1)
    a.save_pretrained(root / "a")
    b.save_pretrained(root / "b")
    shutil.copyfile(root / "b" / "model.safetensors", root / "a" / "model.safetensors")
    return root / "a", a, b


@pytest.mark.parametrize("loader", list(LOADERS))
def test_memory_on_other_base_weights_refuses_to_load(mismatched, loader):
    folder, _, _ = mismatched
    with pytest.raises(MemoryFileError, match=r"rebuild it with `model\.build_memory\(dataset\)`") as info:
        LOADERS[loader](folder)
    assert isinstance(info.value, ValueError)
    assert "check_memory_fingerprint=False" in str(info.value)


def test_fingerprint_check_can_be_disabled(mismatched, query_pixels):
    folder, a, b = mismatched
    loaded = ResMemWrapper.from_pretrained(folder, check_memory_fingerprint=False)
    assert torch.equal(loaded.memory.keys, a.memory.keys)  # a's memory ...
    assert torch.equal(_forward(loaded, query_pixels).base_logits, _forward(b, query_pixels).base_logits)  # b's weights


def test_saving_after_base_weights_changed_raises(tmp_path):
    model = _built()
    with torch.no_grad():
        next(model.base.parameters()).add_(0.01)
    with pytest.raises(ValueError, match=r"build_memory"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / MEMORY_FILE).exists()
    model.build_memory(make_pixel_dataset(40, seed=0), batch_size=16)  # the fix named in the message
    model.save_pretrained(tmp_path / "saved")
    ResMemWrapper.from_pretrained(tmp_path / "saved")


# ------------------------------------------------------------------ damaged memory files
def test_missing_memory_file_raises(tmp_path):
    _built().save_pretrained(tmp_path / "saved")
    os.remove(tmp_path / "saved" / MEMORY_FILE)
    for loader in (ResMemWrapper.from_pretrained, AutoModelForImageClassification.from_pretrained):
        with pytest.raises(MemoryFileError, match=rf"no {MEMORY_FILE}.*build_memory"):
            loader(tmp_path / "saved")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_memory_file_raises(tmp_path, keep):
    _built().save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / MEMORY_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MemoryFileError, match=r"truncated or corrupt.*save the model again"):
        ResMemWrapper.from_pretrained(tmp_path / "saved")


def test_memory_file_from_another_save_raises(tmp_path):
    """A memory file of another size than the config records is caught even with the same weights."""
    model = _built(n=40)
    model.save_pretrained(tmp_path / "a")
    model.build_memory(make_pixel_dataset(25, seed=9), batch_size=16)
    model.save_pretrained(tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / MEMORY_FILE, tmp_path / "a" / MEMORY_FILE)
    with pytest.raises(MemoryFileError, match=r"25 entries but the config says 40.*Save the model again"):
        ResMemWrapper.from_pretrained(tmp_path / "a")


def test_model_without_memory_saves_and_loads(tmp_path, query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"), k=3)
    model.save_pretrained(tmp_path / "empty")
    assert not (tmp_path / "empty" / MEMORY_FILE).exists()
    loaded = ResMemWrapper.from_pretrained(tmp_path / "empty")
    assert len(loaded.memory) == 0
    with pytest.raises(ValueError, match="build_memory"):
        loaded(pixel_values=query_pixels)


def test_a_base_loaded_from_gguf_saves_and_reloads_and_saves_again(tmp_path):
    """transformers de-quantises every GGUF tensor at load but keeps `quantization_config = {"quant_method": "gguf"}`
    on the config; stored as is, the reloaded ResMem model counted as GGUF-quantised and refused a second save."""
    from lm_helpers import distinct_sequences, tiny_base

    base = tiny_base("llama")
    base.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    model = ResMemWrapper.from_base(base, k=2, sigma=1.0)
    model.build_memory(distinct_sequences(2, 12), window=8, stride=6)
    model.save_pretrained(tmp_path / "a")
    assert "quantization_config" not in model.config.to_dict()["base_config"]
    reloaded = ResMemWrapper.from_pretrained(tmp_path / "a")
    reloaded.save_pretrained(tmp_path / "b")  # failed before: "quantized with gguf and is not serializable"
    again = ResMemWrapper.from_pretrained(tmp_path / "b")
    ids = distinct_sequences(1, 8, seed=5)
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    # A folder saved before the fix carries the entry in config.json: it loads unquantised and saves again.
    import json

    config_file = tmp_path / "b" / "config.json"
    saved = json.loads(config_file.read_text())
    saved["base_config"]["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf"}
    config_file.write_text(json.dumps(saved))
    old = ResMemWrapper.from_pretrained(tmp_path / "b")
    assert getattr(old, "hf_quantizer", None) is None
    old.save_pretrained(tmp_path / "c")
