"""Editable causal-LM memories: remove an example and its tokens are forgotten, add it back and they are
memorised again; edits persist through save_pretrained / from_pretrained; on-disk memories refuse edits
with the fix."""

from __future__ import annotations

import os

import pytest
import torch
from lm_helpers import VOCAB, distinct_sequences, tiny_base, word_tokenizer

from resmem import ResMemWrapper
from resmem.memory_disk import OnDiskMemory

WINDOW, STRIDE = 32, 16
N_SEQ, LENGTH = 6, 20


def _model(seqs=None, **kw):
    kw = {"k": 1, "sigma": 1e-3, "temperature": 1.0, **kw}
    model = ResMemWrapper.from_base(tiny_base("llama"), **kw)
    if seqs is not None:
        model.build_memory(seqs, window=WINDOW, stride=STRIDE, residual_top_m=16, batch_size=4)
    return model


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)


@pytest.fixture(scope="module")
def seqs():
    return distinct_sequences(N_SEQ, LENGTH, seed=3)


def _memorised(model, seq):
    """(argmax scores == labels, base argmax == labels) at the positions of `seq` that have a next token."""
    out = _out(model, seq[None])
    labels = seq[1:]
    return out.scores[0, :-1].argmax(-1) == labels, out.base_logits[0, :-1].argmax(-1) == labels


def test_remove_forgets_an_example_and_add_brings_it_back(seqs, tmp_path):
    model = _model(seqs)
    reference = _model(seqs)
    j = 2
    hit, base_hit = _memorised(model, seqs[j])
    wrong = ~base_hit  # positions the base model gets wrong: only the memory can get them right
    assert wrong.sum() >= 10 and hit.all()  # k=1, tiny sigma: every stored token is reproduced (paper Remark 3.2)

    assert model.remove_from_memory([j]) == LENGTH - 1
    assert j not in model.memory.example_ids and len(model.memory) == N_SEQ * (LENGTH - 1) - (LENGTH - 1)
    hit, _ = _memorised(model, seqs[j])
    assert not hit[wrong].any()  # its tokens are no longer memorised where the base model is wrong
    for other in (0, 5):  # the other examples still are
        assert _memorised(model, seqs[other])[0].all()

    model.save_pretrained(tmp_path / "removed")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "removed")
    assert len(loaded.memory) == len(model.memory) and j not in loaded.memory.example_ids
    assert not _memorised(loaded, seqs[j])[0][wrong].any()

    loaded.add_to_memory(seqs[j : j + 1], example_ids=[j], batch_size=4)
    assert _memorised(loaded, seqs[j])[0].all()
    # The same memory as built from all the data at once: same entries (up to order), same scores.
    assert sorted(loaded.memory.example_ids.tolist()) == sorted(reference.memory.example_ids.tolist())
    torch.testing.assert_close(_out(loaded, seqs).scores, _out(reference, seqs).scores)
    loaded.save_pretrained(tmp_path / "added")
    again = ResMemWrapper.from_pretrained(tmp_path / "added")
    torch.testing.assert_close(_out(again, seqs).scores, _out(reference, seqs).scores)
    assert again.config.memory_size == len(reference.memory)


def test_added_entries_equal_built_ones(seqs):
    built = _model(seqs)
    edited = _model(seqs[:3])
    edited.add_to_memory(seqs[3:], batch_size=2)  # default ids continue after the largest: 3, 4, 5
    assert torch.equal(edited.memory.example_ids, built.memory.example_ids)
    assert torch.equal(edited.memory.positions, built.memory.positions)
    for name in ("keys", "values", "indices", "labels"):
        torch.testing.assert_close(getattr(edited.memory, name), getattr(built.memory, name))
    assert edited.memory.top_m == 16 and edited.memory.window == WINDOW


def test_add_to_an_empty_memory_builds_it(seqs):
    built = _model(window=WINDOW, stride=STRIDE, residual_top_m=16)
    built.build_memory(seqs, batch_size=4)
    added = _model(window=WINDOW, stride=STRIDE, residual_top_m=16)
    added.add_to_memory(seqs, batch_size=4)
    assert added.memory.temperature == 1.0 and added.memory.top_m == built.memory.top_m
    torch.testing.assert_close(_out(added, seqs).scores, _out(built, seqs).scores)


def test_add_errors_name_the_fix(seqs):
    model = _model(seqs)
    with pytest.raises(ValueError, match=r"must be unique across the memory; \[1\]"):
        model.add_to_memory(seqs[:2], example_ids=[100, 1])
    with pytest.raises(ValueError, match="example_ids has 1 ids but the data has at least 2 rows"):
        model.add_to_memory(seqs[:2], example_ids=[100])
    with pytest.raises(ValueError, match="Unknown example ids \\[42\\]"):
        model.remove_from_memory([42])
    assert len(model.memory) == N_SEQ * (LENGTH - 1)


def test_add_text_with_another_tokenizer_is_refused():
    tok = word_tokenizer(VOCAB - 2)
    texts = [" ".join(f"w{(7 * i + j) % (VOCAB - 2)}" for j in range(15)) for i in range(4)]
    model = _model()
    model.build_memory(texts, tokenizer=tok, window=WINDOW, stride=STRIDE)
    model.add_to_memory(texts[:1], tokenizer=tok, example_ids=[10])
    assert len(model.memory) == 5 * 15 - 5
    with pytest.raises(ValueError, match="built with another tokenizer"):
        model.add_to_memory(texts[:1], tokenizer=word_tokenizer(VOCAB - 2, shift=1))


def test_on_disk_memory_is_read_only_and_edits_go_through_ram(seqs, tmp_path):
    model = _model()
    model.build_memory_on_disk(seqs, str(tmp_path / "mem"), window=WINDOW, stride=STRIDE, residual_top_m=16, batch_size=4)
    files = {n: os.path.getmtime(tmp_path / "mem" / n) for n in os.listdir(tmp_path / "mem")}
    with pytest.raises(ValueError, match=r"read-only.*to_memory\(\)"):
        model.remove_from_memory([1])
    with pytest.raises(ValueError, match=r"read-only.*build_memory_on_disk"):
        model.add_to_memory(seqs[:1], example_ids=[50])
    model.memory = model.memory.to_memory()  # the documented fix: edit in RAM
    model.remove_from_memory([1])
    assert not _memorised(model, seqs[1])[0].all()
    model.save_pretrained(tmp_path / "saved")
    assert not isinstance(ResMemWrapper.from_pretrained(tmp_path / "saved").memory, OnDiskMemory)
    assert {n: os.path.getmtime(tmp_path / "mem" / n) for n in os.listdir(tmp_path / "mem")} == files


def test_sparse_entries_into_a_dense_memory_are_refused(seqs):
    model = _model()
    model.build_memory(seqs[:2], window=WINDOW, stride=STRIDE, residual_top_m=None)
    sparse = _model(seqs[2:3]).memory  # top-16 residuals: values (n, 16) + indices
    entries = dict(zip(("keys", "values", "indices", "labels", "example_ids", "positions"), sparse.token_tensors()))
    entries["example_ids"] = entries["example_ids"] + 10
    with pytest.raises(ValueError, match="memory has no 'indices' but the new entries have it"):
        model.memory.add(entries)
    assert len(model.memory) == 2 * (LENGTH - 1)


def test_on_disk_memory_rewrite_forgets_into_a_new_folder(seqs, tmp_path):
    model = _model()
    model.build_memory_on_disk(seqs, str(tmp_path / "mem"), window=WINDOW, stride=STRIDE, residual_top_m=16, batch_size=4, shard_size=25)
    model.config.index = "exact"
    files = {n: os.path.getmtime(tmp_path / "mem" / n) for n in os.listdir(tmp_path / "mem")}
    assert _memorised(model, seqs[4])[0].all()
    with pytest.raises(ValueError, match=r"Unknown example ids \[9\]"):
        model.memory.rewrite(str(tmp_path / "bad"), remove=[4, 9])
    with pytest.raises(ValueError, match="new folder"):
        model.memory.rewrite(str(tmp_path / "mem"), remove=[4])
    old = model.memory
    model.memory = old.rewrite(str(tmp_path / "forgot"), remove=[4])
    assert isinstance(model.memory, OnDiskMemory) and len(model.memory) == len(old) - (LENGTH - 1)
    assert 4 not in model.memory.example_ids and model.memory.token_metadata() == old.token_metadata()
    hit, base_hit = _memorised(model, seqs[4])
    assert not hit[~base_hit].any()  # forgotten where the base model is wrong
    assert _memorised(model, seqs[3])[0].all()
    assert {n: os.path.getmtime(tmp_path / "mem" / n) for n in os.listdir(tmp_path / "mem")} == files
    # and back: the removed example's entries, taken from the original memory, added to the rewritten one
    ram = old.to_memory()
    mine = ram.example_ids == 4
    entries = {name: t[mine] for name, t in ram.entry_tensors().items() if t.numel()}
    model.memory = model.memory.rewrite(str(tmp_path / "back"), add=entries)
    assert _memorised(model, seqs[4])[0].all() and len(model.memory) == len(old)
