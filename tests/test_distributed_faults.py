"""Faults in multi-process builds (2 CPU ranks, gloo, torchrun): every rank raises the same clear error, none
hangs, and empty shards work.

One torchrun launch runs every case (`dist_script.py cases`, shared with the other test_distributed*.py files:
start-up costs seconds); each rank records what it raised per case. A hang kills the launch at the timeout
and fails every test here.
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import pytest
import pyarrow as pa
import torch
from conftest import make_base, make_pixel_dataset
from dist_script import case_status as status
from dist_script import shared_cases_run
from safetensors.torch import load_file

import resmem.distributed as distributed  # attribute access: the 2-rank tests also run on older code
from resmem import ResMemWrapper
from resmem.distributed import ProcessInfo, shard_dataset

MISMATCH = "The processes do not see the same dataset"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return shared_cases_run(tmp_path_factory)  # one torchrun launch for every test_distributed*.py file


def one_process_memory(dataset):
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=3, sigma=0.7, temperature=1.3)
    m = model.build_memory(dataset, batch_size=4)
    return {"keys": m.keys, "base_logits": m.base_logits, "labels": m.labels, "example_ids": m.example_ids}


# ---------------------------------------------------------------------------------------------- in one process
def test_signature_depends_on_rows_and_order_not_on_how_they_were_loaded():
    ds = make_pixel_dataset(40, seed=5)
    rows = ds.with_format("numpy")[:]
    # Same rows through other loading paths: from a list of dicts, and from arrow with other chunking.
    again = datasets.Dataset.from_list(ds.to_list(), features=ds.features)
    table = pa.concat_tables([ds.data.table.slice(0, 7), ds.data.table.slice(7, 33)])
    rechunked = datasets.Dataset(table)
    sig = distributed.data_signature(ds)
    assert distributed.data_signature(again) == sig == distributed.data_signature(rechunked) == distributed.data_signature(ds.select(range(40)))
    assert ds._fingerprint != again._fingerprint  # why `_fingerprint` cannot be the check
    assert distributed.data_signature(ds.shuffle(seed=1)) != sig
    assert distributed.data_signature(ds.select(range(39))) != sig
    changed = ds.map(lambda x, i: {"label": (x["label"] + 1) % 5 if i == 39 else x["label"]}, with_indices=True)
    assert distributed.data_signature(changed) != sig  # the last row is always sampled
    assert np.asarray(rows["label"]).shape == (40,)
    # lists of texts, lists of token ids, tensors (with their attention mask)
    assert distributed.data_signature(["a b", "c"]) == distributed.data_signature(["a b", "c"]) != distributed.data_signature(["c", "a b"])
    assert distributed.data_signature([[1, 2], [3]]) != distributed.data_signature([[1], [2, 3]])
    ids = torch.arange(12).reshape(3, 4)
    assert distributed.data_signature(ids) == distributed.data_signature(ids.clone()) != distributed.data_signature(ids.flip(0))
    assert distributed.data_signature(ids, torch.ones(3, 4)) != distributed.data_signature(ids, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="map-style"):
        distributed.data_signature(ds.to_iterable_dataset())


def test_empty_shard_of_a_one_row_dataset():
    """The last rank's shard of a 1-row dataset is empty (the old code: IndexError from select(range(1, 1)))."""
    ds = make_pixel_dataset(1, seed=5)
    shard, first = shard_dataset(ds, ProcessInfo(2, 1))
    assert len(shard) == 0 and first == 1
    shard, first = shard_dataset(ds, ProcessInfo(2, 0))
    assert len(shard) == 1 and first == 0


def test_the_guard_is_a_no_op_in_one_process():
    with distributed.DistributedBuild(ProcessInfo(), data=[1, 2]) as build:
        assert build.sync("x") == ["x"]
        assert build.shard([1, 2]) == ([1, 2], 0, None)
    with pytest.raises(KeyError), distributed.DistributedBuild(ProcessInfo(), data=[1]):
        raise KeyError("local errors pass through unchanged")


# ---------------------------------------------------------------------------------------------- 2 ranks
@pytest.mark.parametrize("case", ["lengths_ram", "lengths_disk"])
def test_ranks_with_different_lengths_get_the_same_clear_error(faults, case):
    ranks = status(faults, case)
    assert ranks[0] == ranks[1]  # the same ValueError everywhere, nobody left waiting
    assert ranks[0].startswith(f"ERROR ValueError: {MISMATCH}")
    assert "process 0: 20 rows" in ranks[0] and "process 1: 21 rows" in ranks[0]
    assert "same rows in the same order" in ranks[0]
    # on disk the check runs before anything is written: no complete-looking manifest
    assert not (faults / case / "resmem_memory.index.json").exists()


@pytest.mark.parametrize("case", ["shuffle_ram", "shuffle_disk", "predict_shuffle"])
def test_rank_dependent_shuffle_is_refused(faults, case):
    """`dataset.shuffle(seed=rank)` used to build a wrong memory silently (rows missing and duplicated)."""
    ranks = status(faults, case)
    assert ranks[0] == ranks[1]
    assert ranks[0].startswith(f"ERROR ValueError: {MISMATCH}") and "same seed on every process" in ranks[0]


def test_different_chunk_rows_per_rank_are_refused(faults):
    ranks = status(faults, "chunk_rows_disk")
    assert ranks[0] == ranks[1]
    assert ranks[0].startswith("ERROR ValueError: The processes pass different arguments to the on-disk memory build")
    assert "'chunk_rows': 4" in ranks[0] and "'chunk_rows': 5" in ranks[0]


@pytest.mark.parametrize("case,rows", [("one_row_ram", 1), ("one_row_disk", 1), ("small_chunk_disk", 9)])
def test_empty_shards_build_the_one_process_memory(faults, case, rows):
    """A 1-row dataset, and on disk a last chunk of 1 row for 2 ranks (chunk_rows=4 over 9 rows)."""
    assert status(faults, case) == ["OK", "OK"]
    want = one_process_memory(make_pixel_dataset(rows, seed=5))
    for rank in (0, 1):
        got = load_file(str(faults / f"{case}.rank{rank}.safetensors"))
        for name, expected in want.items():
            assert torch.equal(got[name], expected), (case, rank, name)


def test_a_failing_writer_on_the_main_process_stops_every_rank(faults):
    """The on-disk target already holds a memory: only rank 0 (the writer) raises; rank 1 must not wait for it."""
    ranks = status(faults, "writer_fails_disk")
    assert ranks[0].startswith("ERROR ValueError:") and "already holds a memory" in ranks[0]
    assert ranks[1].startswith("ERROR ValueError: Process 0 of 2 failed") and "already holds a memory" in ranks[1]


@pytest.mark.parametrize("case", ["bad_label_ram", "bad_label_disk"])
def test_an_exception_on_one_rank_mid_build_stops_every_rank(faults, case):
    """Row 19 of 20 has label 99: only rank 1 embeds it; rank 0 (waiting in a gather) raises too."""
    ranks = status(faults, case)
    expected = "Labels must lie in [0, 5) for this model; found [99]"
    assert ranks[1].startswith("ERROR ValueError: " + expected)
    assert ranks[0].startswith("ERROR ValueError: Process 1 of 2 failed") and expected in ranks[0]
    assert not os.path.exists(faults / case / "resmem_memory.index.json")


def test_signature_samples_evenly_spaced_rows_including_both_ends():
    """Every row of a short dataset, and both ends and the middle of a long one, change the signature."""
    for n, changed_rows in ((40, range(40)), (1000, (0, 507, 999))):  # 507 = round(32 * 999 / 63)
        base = list(range(n))
        sig = distributed.data_signature(base)
        for r in changed_rows:
            other = list(base)
            other[r] = -1
            assert distributed.data_signature(other) != sig, (n, r)


def test_hflip_memory_with_a_residual_model_is_the_one_process_memory(faults):
    """`augment="hflip"` + `residual_model` over 2 ranks: originals of every rank first, then the flipped copies."""
    assert status(faults, "hflip_residual_ram") == ["OK", "OK"]
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=3)
    m = model.build_memory(make_pixel_dataset(9, seed=5), batch_size=4, augment="hflip", residual_model=make_base("resnet", seed=4))
    for rank in (0, 1):
        got = load_file(str(faults / f"hflip_residual_ram.rank{rank}.safetensors"))
        for name in ("keys", "base_logits", "labels", "example_ids"):
            assert torch.allclose(got[name].to(getattr(m, name).dtype), getattr(m, name), atol=1e-6), (rank, name)
