"""Editable memory: add entries, remove them by source example id, persist both through save/load."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from conftest import make_base, make_pixel_dataset

from resmem import ResidualMemory, ResMemWrapper


def _model(dataset=None, **kw):
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=4, sigma=0.8, temperature=1.3, **kw)
    if dataset is not None:
        model.build_memory(dataset, batch_size=16)
    return model


def _scores(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).scores


@pytest.fixture(scope="module")
def parts():
    return make_pixel_dataset(30, seed=0), make_pixel_dataset(12, seed=5)


def test_add_then_remove_equals_building_on_the_same_data(parts, query_pixels):
    first, extra = parts
    model = _model(first)
    model.add_to_memory(extra, batch_size=16)  # the model embeds, the memory stores
    assert len(model.memory) == 42 and model.config.memory_size in (30, 42)
    assert torch.equal(model.memory.example_ids, torch.arange(42))
    together = _model(datasets.concatenate_datasets([first, extra]))
    torch.testing.assert_close(_scores(model, query_pixels), _scores(together, query_pixels))

    assert model.remove_from_memory(range(30, 42)) == 12
    assert torch.equal(model.memory.example_ids, torch.arange(30))
    assert torch.equal(_scores(model, query_pixels), _scores(_model(first), query_pixels))


def test_edits_persist_through_save_and_load(parts, tmp_path, query_pixels):
    first, extra = parts
    model = _model(first)
    model.add_to_memory(extra, example_ids=range(1000, 1012), batch_size=16)
    model.remove_from_memory([0, 5, 1003])
    before = _scores(model, query_pixels)
    model.save_pretrained(tmp_path / "saved")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    assert len(loaded.memory) == 39
    assert torch.equal(loaded.memory.example_ids, model.memory.example_ids)
    assert 1003 not in loaded.memory.example_ids and 0 not in loaded.memory.example_ids
    assert torch.equal(_scores(loaded, query_pixels), before)


def test_removing_from_a_trained_ivf_index_keeps_it_trained(query_pixels):
    model = _model(make_pixel_dataset(120, seed=0), index="IVF4,Flat", index_params={"nprobe": 4})
    _scores(model, query_pixels)
    index = model.memory._index
    model.remove_from_memory(range(20))
    model.add_to_memory(make_pixel_dataset(10, seed=3), batch_size=10)
    expected = _scores(model, query_pixels)
    assert model.memory._index is index and len(index) == 110
    model.config.index = "exact"  # nprobe = nlist: the IVF search is exact, so both must agree
    torch.testing.assert_close(_scores(model, query_pixels), expected)


def test_remove_unknown_ids_raises_and_removes_nothing(parts):
    model = _model(parts[0])
    with pytest.raises(ValueError, match=r"Unknown example ids \[77, 99\].*Nothing was removed"):
        model.memory.remove([3, 77, 99])
    assert len(model.memory) == 30


def test_add_with_existing_ids_raises(parts):
    model = _model(parts[0])
    with pytest.raises(ValueError, match="must be unique across the memory; \\[4\\]"):
        model.add_to_memory(parts[1], example_ids=[4] + list(range(100, 111)), batch_size=16)
    assert len(model.memory) == 30


def test_deepcopy_keeps_memory_add_working(parts):
    model = _model(parts[0])
    clone = copy.deepcopy(model)
    clone.add_to_memory(parts[1], batch_size=16)
    assert len(clone.memory) == 42 and len(model.memory) == 30
    # The store holds no reference to a model (no back-pointer to re-point on copy).
    assert not any(isinstance(v, torch.nn.Module) and v is not clone.memory for v in vars(clone.memory).values())


def test_detached_memory_explains_how_to_add_a_dataset(parts):
    with pytest.raises(ValueError, match="add_to_memory"):
        ResidualMemory().add(parts[0])
    with pytest.raises(ValueError, match="add_to_memory"):  # also from a model's memory: the model embeds
        _model(parts[0]).memory.add(parts[1], batch_size=16)


def test_add_raw_entries_to_an_empty_memory():
    memory = ResidualMemory()
    memory.add({"keys": torch.randn(3, 4), "base_logits": torch.randn(3, 2), "labels": torch.tensor([0, 1, 1])})
    memory.add({"keys": torch.randn(2, 4), "base_logits": torch.randn(2, 2), "labels": torch.tensor([1, 0])})
    assert torch.equal(memory.example_ids, torch.arange(5))
    with pytest.raises(ValueError, match="dimension 5"):
        memory.add({"keys": torch.randn(1, 5), "base_logits": torch.randn(1, 2), "labels": torch.tensor([0])})
