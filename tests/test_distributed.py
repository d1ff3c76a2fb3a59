"""Multi-process build and evaluation: 2 CPU ranks (gloo, torchrun) give exactly the 1-process memory and scores."""

from __future__ import annotations

import pytest
import torch
from conftest import make_base, make_pixel_dataset, random_pixels
from dist_script import shared_cases_run
from safetensors.torch import load_file

from resmem import ResMemWrapper
from resmem.distributed import ProcessInfo, gather_rows, shard_bounds, shard_rows
from resmem.evaluation import predict


@pytest.mark.parametrize("length,shards", [(10, 3), (61, 2), (1, 2), (0, 2), (8, 4)])
def test_contiguous_shards_cover_the_dataset_in_order(length, shards):
    bounds = [shard_bounds(length, shards, i) for i in range(shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("length,shards", [(10, 3), (61, 2), (1, 2), (0, 2), (8, 4), (3, 5)])
def test_dataset_shards_are_datasets_contiguous_shards(length, shards):
    """A `Dataset` is split by `Dataset.shard(contiguous=True)`; the first row numbers and the list / tensor
    shards follow the same bounds, so rank-ordered gathers rebuild the dataset's order."""
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(length))})
    rows, lists, tensors = [], [], []
    for rank in range(shards):
        shard, first = shard_rows(ds, ProcessInfo(shards, rank))
        assert isinstance(shard, datasets.Dataset) and shard[:]["x"] == list(range(first, first + len(shard)))
        if len(shard):  # datasets raises IndexError for an empty shard at the end; resmem gives an empty one
            assert shard[:]["x"] == ds.shard(shards, rank, contiguous=True)[:]["x"]
        rows += shard[:]["x"]
        lists += shard_rows(list(range(length)), ProcessInfo(shards, rank))[0]
        tensors.append(shard_rows(torch.arange(length), ProcessInfo(shards, rank))[0])
    assert rows == lists == list(range(length)) and torch.equal(torch.cat(tensors), torch.arange(length))


def test_gather_rows_is_identity_in_one_process():
    t = torch.arange(6).reshape(3, 2)
    assert gather_rows(t, ProcessInfo()) is t


def _single_process(n):
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=5, sigma=0.7, temperature=1.3)
    model.build_memory(make_pixel_dataset(n, seed=3), batch_size=8)
    with torch.no_grad():
        scores = model(pixel_values=torch.from_numpy(random_pixels(9, seed=777))).scores
    return model, scores, predict(model, make_pixel_dataset(n, seed=4), batch_size=8)


def test_two_cpu_ranks_build_the_same_memory_and_scores(tmp_path_factory):
    n = 37  # odd: the shards have unequal sizes (19 and 18 rows)
    tmp_path = shared_cases_run(tmp_path_factory) / "image"  # one torchrun launch for every test_distributed*.py file
    got = load_file(str(tmp_path / "result.safetensors"))
    assert got["world"].item() == 2
    model, scores, preds = _single_process(n)
    memory = model.memory
    for name in ("keys", "base_logits", "labels", "example_ids"):
        assert torch.equal(got[name], getattr(memory, name)), name
    assert torch.equal(got["scores"], scores)
    assert torch.equal(got["pred_base"], preds.base) and torch.equal(got["pred_resmem"], preds.resmem)
    assert torch.equal(got["pred_labels"], preds.labels)
    # Only the main process wrote, and what it wrote loads back to the same scores.
    loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=torch.from_numpy(random_pixels(9, seed=777))).scores, scores)
