"""Damaged or hostile memory contents are refused where they enter: at load (naming the file) and at add.

Hostile files are made by editing real saved files with safetensors (`load_file` / `save_file`, keeping the
metadata), so every other part of the file stays what a real save wrote.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, make_base, make_pixel_dataset
from lm_helpers import VOCAB, distinct_sequences, tiny_base
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resmem import MemoryFileError, ResidualMemory, ResMemWrapper
from resmem.evaluation import predict
from resmem.hub import MEMORY_FILE
from resmem.memory_disk import MemoryWriter, OnDiskMemory
from resmem.memory_lm import TokenResidualMemory


def _edit_memory_file(path, edit, metadata_edit=None):
    """Rewrite the safetensors file at `path` with `edit(tensors)` applied, keeping (or editing) its metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    edit(tensors)
    if metadata_edit is not None:
        metadata_edit(metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ------------------------------------------------------------------ classifier memory files
@pytest.fixture(scope="module")
def saved_image_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image") / "saved"
    model = ResMemWrapper.from_base(make_base("resnet"), k=3, sigma=0.8)
    model.build_memory(make_pixel_dataset(30, seed=0), batch_size=16)
    model.save_pretrained(folder)
    return folder


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])

    return edit


def _nan_key(k):
    k = k.clone()
    k[7, 2] = float("nan")
    return k


def _inf_logit(x):
    x = x.clone()
    x[29, 0] = float("inf")
    return x


def _label(value):
    def fn(y):
        y = y.clone()
        y[4] = value
        return y

    return fn


def _duplicate_id(ids):
    ids = ids.clone()
    ids[3] = ids[5]
    return ids


IMAGE_CASES = {
    "nan_key": (_set("keys", _nan_key), r"`keys` contains NaN or inf \(rows \[7\]"),
    "inf_logit": (_set("base_logits", _inf_logit), r"`base_logits` contains NaN or inf \(rows \[29\]"),
    "label_too_large": (_set("labels", _label(NUM_LABELS)), rf"`labels` must lie in \[0, {NUM_LABELS}\).*\[{NUM_LABELS}\]"),
    "label_negative": (_set("labels", _label(-1)), r"`labels` must lie in \[0, 5\).*\[-1\]"),
    "float_labels": (_set("labels", lambda y: y.double() + 0.5), r"`labels` must hold integers.*refused rather than truncated"),
    "keys_3d": (_set("keys", lambda k: k.reshape(k.shape[0], 2, -1)), r"`keys` must be a 2-D tensor \(N, D\)"),
    "duplicate_ids": (_set("example_ids", _duplicate_id), r"`example_ids` must be unique"),
    "float_ids": (_set("example_ids", lambda ids: ids.float()), r"`example_ids` must hold integers"),
    "logits_3d": (_set("base_logits", lambda x: x.unsqueeze(2)), r"`base_logits` must be a 2-D tensor"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_hostile_classifier_memory_file_is_refused_naming_the_file(saved_image_model, tmp_path, case):
    edit, message = IMAGE_CASES[case]
    folder = tmp_path / "saved"
    shutil.copytree(saved_image_model, folder)
    _edit_memory_file(folder / MEMORY_FILE, edit)
    with pytest.raises(MemoryFileError, match=rf"The memory file .*{MEMORY_FILE}: {message}.*save the model again"):
        ResMemWrapper.from_pretrained(folder)


def test_memory_with_another_logits_width_is_refused_at_load(saved_image_model, tmp_path):
    """A memory consistent in itself (labels < width) but built for 6 classes fails at load, not inside forward."""
    folder = tmp_path / "saved"
    shutil.copytree(saved_image_model, folder)
    _edit_memory_file(folder / MEMORY_FILE, _set("base_logits", lambda x: torch.cat([x, x[:, :1]], dim=1)))
    with pytest.raises(MemoryFileError, match=rf"memory file {MEMORY_FILE} in .*saved stores base logits over 6 classes, but the model has {NUM_LABELS}.*build_memory"):
        ResMemWrapper.from_pretrained(folder)


def test_untouched_saved_memory_still_loads(saved_image_model, query_pixels):
    loaded = ResMemWrapper.from_pretrained(saved_image_model)
    with torch.no_grad():
        assert torch.isfinite(loaded(pixel_values=query_pixels).scores).all()


# ------------------------------------------------------------------ causal-LM memory files
@pytest.fixture(scope="module")
def saved_token_memory(tmp_path_factory):
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=2, sigma=1.0, residual_top_m=8)
    model.build_memory(distinct_sequences(3, 12), window=12, stride=8)
    path = tmp_path_factory.mktemp("lm") / MEMORY_FILE
    model.memory.save(str(path))
    return path


def _first_value(name, value):
    def fn(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return _set(name, fn)


TOKEN_CASES = {
    "indices_narrower_than_values": (_set("indices", lambda i: i[:, :4].contiguous()), r"`indices` \(\d+, 4\) must have the shape of `values` \(\d+, 8\)"),
    "index_ge_vocab": (_first_value("indices", VOCAB), rf"`indices` must lie in \[0, {VOCAB}\).*\[{VOCAB}\]"),
    "negative_index": (_first_value("indices", -3), rf"`indices` must lie in \[0, {VOCAB}\).*\[-3\]"),
    "label_ge_vocab": (_first_value("labels", VOCAB + 1), rf"`labels` must lie in \[0, {VOCAB}\)"),
    "nan_value": (_first_value("values", float("nan")), r"`values` contains NaN or inf"),
    "inf_key": (_first_value("keys", float("-inf")), r"`keys` contains NaN or inf"),
    "float_indices": (_set("indices", lambda i: i.float()), r"`indices` must hold integers"),
    "float_labels": (_set("labels", lambda y: y.float()), r"`labels` must hold integers"),
    "dropped_indices": (_set("indices", lambda i: i[:0, :0].contiguous()), r"dense `values` must have one column per vocabulary item"),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_hostile_token_memory_file_is_refused_naming_the_file(saved_token_memory, tmp_path, case):
    edit, message = TOKEN_CASES[case]
    path = tmp_path / MEMORY_FILE
    shutil.copyfile(saved_token_memory, path)
    _edit_memory_file(path, edit)
    with pytest.raises(MemoryFileError, match=rf"The memory file {path}: {message}"):
        TokenResidualMemory().load(str(path))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("top_m", "4", r"the metadata says top_m=4"),
        ("top_m", "", r"the metadata says the residuals are dense"),
        ("vocab_size", "lots", r"lacks a valid vocab_size"),
        ("temperature", "nan", r"temperature=nan"),
    ],
)
def test_token_memory_metadata_disagreeing_with_tensors_is_refused(saved_token_memory, tmp_path, field, value, message):
    path = tmp_path / MEMORY_FILE
    shutil.copyfile(saved_token_memory, path)
    _edit_memory_file(path, lambda t: None, lambda m: m.__setitem__(field, value))
    with pytest.raises(MemoryFileError, match=rf"{path}: .*{message}"):
        TokenResidualMemory().load(str(path))


def test_hostile_token_memory_is_refused_by_from_pretrained(tmp_path):
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=2, sigma=1.0, residual_top_m=8)
    model.build_memory(distinct_sequences(2, 12), window=12, stride=8)
    model.save_pretrained(tmp_path / "saved")
    _edit_memory_file(tmp_path / "saved" / MEMORY_FILE, _set("indices", lambda i: i[:, :3].contiguous()))
    with pytest.raises(MemoryFileError, match=rf"{MEMORY_FILE}: `indices` .* must have the shape of `values`"):
        ResMemWrapper.from_pretrained(tmp_path / "saved")


def test_set_token_entries_refuses_out_of_vocabulary_indices(saved_token_memory):
    memory = TokenResidualMemory()
    memory.load(str(saved_token_memory))
    keys, values, indices, labels, ids, positions = memory.token_tensors()
    bad = indices.clone()
    bad[0, 0] = VOCAB
    fresh = TokenResidualMemory()
    with pytest.raises(ValueError, match=r"the entries passed to set_token_entries: `indices` must lie in \[0, 128\)"):
        fresh.set_token_entries(keys, values, bad, labels, ids, positions, **memory.token_metadata())
    assert len(fresh) == 0


# ------------------------------------------------------------------ memory.add / remove
def _raw_memory():
    memory = ResidualMemory()
    g = torch.Generator().manual_seed(0)
    memory.add({"keys": torch.randn(6, 4, generator=g), "base_logits": torch.randn(6, 5, generator=g), "labels": torch.arange(6) % 5})
    return memory


def _snapshot(memory):
    return {name: getattr(memory, name).clone() for name in ("keys", "base_logits", "labels", "example_ids")}


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(labels=torch.tensor([0, 77])), r"the entries passed to add: `labels` must lie in \[0, 5\).*\[77\]"),
        (dict(labels=torch.tensor([0.0, 1.7])), r"`labels` must hold integers.*refused rather than truncated"),
        (dict(keys=torch.tensor([[0.0, 1.0, float("nan"), 0.0], [1.0, 1.0, 1.0, 1.0]])), r"`keys` contains NaN or inf \(rows \[0\]"),
        (dict(base_logits=torch.full((2, 5), float("inf"))), r"`base_logits` contains NaN or inf"),
        (dict(base_logits=torch.zeros(2, 6)), r"base_logits (have 6 columns but the model has 5 classes|of width 6 \(memory: 5\))"),
        (dict(example_ids=[10, 10]), r"`example_ids` must be unique"),
        (dict(example_ids=[10.5, 11.0]), r"Example ids must be integers"),
    ],
)
def test_add_refuses_bad_entries_and_leaves_the_memory_unchanged(change, message):
    memory = _raw_memory()
    before = _snapshot(memory)
    entries = {"keys": torch.randn(2, 4), "base_logits": torch.randn(2, 5), "labels": torch.tensor([0, 1])}
    entries.update(change)
    with pytest.raises(ValueError, match=message):
        memory.add(entries)
    after = _snapshot(memory)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_nan_keys_added_are_refused_so_they_never_reach_a_saved_file(tmp_path):
    memory = _raw_memory()
    with pytest.raises(ValueError, match="NaN"):
        memory.add({"keys": torch.full((1, 4), float("nan")), "base_logits": torch.zeros(1, 5), "labels": torch.tensor([1])})
    memory.save(str(tmp_path / MEMORY_FILE))
    loaded = ResidualMemory()
    loaded.load(str(tmp_path / MEMORY_FILE))
    assert len(loaded) == 6 and torch.isfinite(loaded.keys).all()


@pytest.mark.parametrize("ids", [[3.9], 3.9, torch.tensor([3.0]), np.array([2.5])])
def test_remove_refuses_non_integer_ids(ids):
    memory = _raw_memory()
    with pytest.raises(ValueError, match="Example ids must be integers"):
        memory.remove(ids)
    assert torch.equal(memory.example_ids, torch.arange(6))


def test_remove_accepts_integer_ids_of_any_integer_type():
    memory = _raw_memory()
    assert memory.remove(np.array([3], dtype=np.int32)) == 1
    assert memory.remove(torch.tensor([4], dtype=torch.int16)) == 1
    assert memory.remove(np.int64(0)) == 1
    assert memory.example_ids.tolist() == [1, 2, 5]


# ------------------------------------------------------------------ batch_size
@pytest.fixture(scope="module")
def image_model():
    model = ResMemWrapper.from_base(make_base("resnet"), k=3, sigma=0.8)
    model.build_memory(make_pixel_dataset(20, seed=0), batch_size=10)
    return model


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, True])
@pytest.mark.parametrize("entry", ["build_memory", "add_to_memory", "tune", "predict", "build_memory_on_disk"])
def test_image_entry_points_refuse_a_bad_batch_size(image_model, tmp_path, entry, batch_size):
    data = make_pixel_dataset(6, seed=1)
    size = len(image_model.memory)
    calls = {
        "build_memory": lambda: image_model.build_memory(data, batch_size=batch_size),
        "add_to_memory": lambda: image_model.add_to_memory(data, batch_size=batch_size),
        "tune": lambda: image_model.tune(data, k=[1, 2], sigma=[1.0], temperature=[1.0], batch_size=batch_size),
        "predict": lambda: predict(image_model, data, batch_size=batch_size),
        "build_memory_on_disk": lambda: image_model.build_memory_on_disk(data, str(tmp_path / "disk"), batch_size=batch_size),
    }
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer .*pass e\.g\. batch_size=32"):
        calls[entry]()
    assert len(image_model.memory) == size and not os.path.exists(tmp_path / "disk")


@pytest.mark.parametrize("entry", ["build_memory", "evaluate_lm", "tune"])
def test_causal_lm_entry_points_refuse_batch_size_zero(entry):
    from resmem.evaluation_lm import evaluate_lm

    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=2, sigma=1.0)
    data = distinct_sequences(2, 12)
    if entry != "build_memory":
        model.build_memory(data, window=12, stride=8)
    calls = {
        "build_memory": lambda: model.build_memory(data, batch_size=0, window=12, stride=8),
        "evaluate_lm": lambda: evaluate_lm(model, data, batch_size=0, window=12, stride=8),
        "tune": lambda: model.tune(data, k=[1, 2], sigma=[1.0], batch_size=0, window=12, stride=8),
    }
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        calls[entry]()


# ------------------------------------------------------------------ on-disk memories
def _write_disk(folder, n=60, dim=4, classes=3):
    rng = np.random.default_rng(0)
    with MemoryWriter(str(folder), fingerprint="synthetic", layer="none", shard_size=25) as writer:
        writer.add(rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((n, classes)).astype(np.float32), rng.integers(0, classes, n))


@pytest.mark.parametrize(
    "chunk,message",
    [
        (dict(keys=np.full((2, 4), np.nan, np.float32)), r"MemoryWriter.add: `keys` contains NaN"),
        (dict(labels=np.array([0, 3])), r"MemoryWriter.add: `labels` must lie in \[0, 3\)"),
        (dict(labels=np.array([0.0, 1.0])), r"`labels` must hold integers"),
        (dict(example_ids=np.array([7, 7])), r"`example_ids` must be unique"),
    ],
)
def test_memory_writer_checks_every_value_it_writes(tmp_path, chunk, message):
    args = dict(keys=np.zeros((2, 4), np.float32), base_logits=np.zeros((2, 3), np.float32), labels=np.array([0, 1]), example_ids=None)
    args.update(chunk)
    writer = MemoryWriter(str(tmp_path / "m"))
    with pytest.raises(ValueError, match=message):
        writer.add(**args)
    assert writer._pending_rows == 0


@pytest.mark.parametrize(
    "edit,message",
    [
        (_set("keys", lambda k: k.reshape(k.shape[0], 2, 2)), r"`keys` has shape \[25, 2, 2\], expected 2 dimensions"),
        (_set("keys", lambda k: k[:, :3].contiguous()), r"`keys` has 3 columns but the manifest says 4"),
        (_set("base_logits", lambda x: x.to(torch.int64)), r"`base_logits` has dtype int64, expected floating"),
        (_set("labels", lambda y: y.float()), r"`labels` has dtype float32, expected integer"),
        (_set("example_ids", lambda y: y[:20].contiguous()), r"its tensors have different row counts"),
    ],
)
def test_on_disk_shard_with_hostile_header_is_refused_at_open(tmp_path, edit, message):
    _write_disk(tmp_path / "m")
    shard = tmp_path / "m" / "resmem_memory-00001.safetensors"
    _edit_memory_file(shard, edit)
    with pytest.raises(MemoryFileError, match=rf"The memory shard {shard}: {message}.*Rebuild the memory"):
        OnDiskMemory.open(str(tmp_path / "m"))


def test_on_disk_manifest_with_wrong_types_is_refused(tmp_path):
    import json

    _write_disk(tmp_path / "m")
    path = tmp_path / "m" / "resmem_memory.index.json"
    manifest = json.loads(path.read_text())
    manifest["dim"] = "4"
    path.write_text(json.dumps(manifest))
    with pytest.raises(MemoryFileError, match=r"manifest .*field 'dim' must be a int"):
        OnDiskMemory.open(str(tmp_path / "m"))
    path.write_text("{not json")
    with pytest.raises(MemoryFileError, match=r"manifest .* is truncated or not JSON.*save the model again"):
        OnDiskMemory.open(str(tmp_path / "m"))


# ------------------------------------------------------------------ the checks themselves
def test_finiteness_is_checked_in_chunks_that_cover_every_row(monkeypatch):
    """With tiny chunks, a NaN in the very last row is still found (and its row reported)."""
    import resmem.validation as validation
    from resmem.validation import check_classifier_entries

    monkeypatch.setattr(validation, "CHUNK_ELEMENTS", 8)  # 2 rows of 4 per chunk
    keys = torch.zeros(11, 4)
    keys[10, 3] = float("nan")
    entries = dict(keys=keys, base_logits=torch.zeros(11, 2), labels=torch.zeros(11, dtype=torch.long), example_ids=torch.arange(11))
    with pytest.raises(ValueError, match=r"`keys` contains NaN or inf \(rows \[10\]"):
        check_classifier_entries(entries)
    keys[10, 3] = 0.0
    assert check_classifier_entries(entries)["keys"] is keys  # valid entries pass, not copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_single_nan_or_inf_is_found_wherever_it_is(dtype):
    """The one-pass min/max test against an independent element-wise check, at 30 random positions."""
    from resmem.validation import check_token_entries

    rng = np.random.default_rng(0)
    n, m = 300, 16
    entries = dict(
        keys=torch.zeros(n, 4), values=torch.zeros(n, m, dtype=dtype), indices=torch.zeros(n, m, dtype=torch.int32),
        labels=torch.zeros(n, dtype=torch.long), example_ids=torch.zeros(n, dtype=torch.long), positions=torch.arange(n),
    )
    for bad in rng.choice([np.nan, np.inf, -np.inf], size=30):
        row, col = int(rng.integers(n)), int(rng.integers(m))
        entries["values"].zero_()
        entries["values"][row, col] = float(bad)
        assert not torch.isfinite(entries["values"]).all()  # the independent check
        with pytest.raises(ValueError, match=rf"`values` contains NaN or inf \(rows \[{row}\]"):
            check_token_entries(entries, VOCAB, "test", top_m=m)
    entries["values"].zero_()
    check_token_entries(entries, VOCAB, "test", top_m=m)


def test_example_ids_in_any_order_pass_and_a_repeat_in_any_order_fails():
    from resmem.validation import check_classifier_entries

    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(0)) * 3
    entries = dict(keys=torch.zeros(1000, 2), base_logits=torch.zeros(1000, 2), labels=torch.zeros(1000, dtype=torch.long), example_ids=ids)
    check_classifier_entries(entries)
    entries["example_ids"] = ids.clone()
    entries["example_ids"][917] = ids[12]
    with pytest.raises(ValueError, match=rf"`example_ids` must be unique.*repeated: \[{int(ids[12])}\]"):
        check_classifier_entries(entries)
