"""Explanations: `forward(..., output_neighbors=True)`, `model.explain` and `plot_explanation`.

Neighbours, weights and contributions are checked against an independent numpy computation (brute-force
plain L2 distances over the memory's own tensors, keys from plain torch hooks; `reference.py`,
`lm_helpers.py`), for image classifiers and causal LMs (sparse top-m and dense residuals).
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import pytest
import torch
from conftest import make_base, make_image_dataset, make_pixel_dataset, random_pixels
from lm_helpers import VOCAB, distinct_sequences, hook_keys, np_softmax, tiny_base, word_tokenizer
from reference import hooked_forward, np_knn, np_residuals

from resmem import ResMemWrapper
from resmem.explain import Explanation, plot_explanation

K, SIGMA, T = 5, 0.4, 1.4
WINDOW, STRIDE = 12, 8
FIELDS = ("neighbor_ids", "neighbor_distances", "neighbor_weights", "neighbor_contributions")


@pytest.fixture(scope="module")
def image_model():
    """A tiny ResNet with a 40-entry memory whose example ids differ from its rows (entries 0, 3, 5 removed)."""
    data = make_pixel_dataset(40, seed=0)
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=K, sigma=SIGMA, temperature=T)
    model.build_memory(data, batch_size=16, progress=False)
    model.remove_from_memory([0, 3, 5])  # rows shift: a memory row is no longer its example id
    return model, data


@pytest.fixture(scope="module")
def queries():
    return torch.from_numpy(random_pixels(6, seed=777))


def image_reference(model, queries):
    """Neighbours of each query from numpy: `(pred (B,), ids (B, k), d, w, r_pred, contrib, labels, residual (B, C))`."""
    memory = model.memory
    q_keys, q_logits = hooked_forward(model.base, model.config.layer, queries)  # (B, D), (B, C)
    d, rows = np_knn(q_keys, memory.keys.double().numpy(), K)  # (B, k)
    w = np_softmax(-d / SIGMA)  # (B, k)
    r = np_residuals(memory.base_logits.double().numpy(), memory.labels.numpy(), T)  # (N, C)
    residual = (w[:, :, None] * r[rows]).sum(axis=1)  # (B, C)
    pred = (np_softmax(q_logits / T) + residual).argmax(axis=1)  # (B,)
    r_pred = np.take_along_axis(r[rows], pred[:, None, None], axis=2)[..., 0]  # (B, k)
    ids = memory.example_ids.numpy()[rows]
    return pred, ids, d, w, r_pred, w * r_pred, memory.labels.numpy()[rows], residual


def test_image_neighbors_match_numpy(image_model, queries):
    model, _ = image_model
    out = model(pixel_values=queries, output_neighbors=True)
    pred, ids, d, w, r_pred, contrib, labels, _ = image_reference(model, queries)
    assert out.neighbor_ids.shape == (6, K) and out.neighbor_ids.dtype == torch.long
    assert (out.scores.argmax(-1).numpy() == pred).all()
    # Example ids, not memory rows (the removal made them differ), nearest first.
    assert (out.neighbor_ids.numpy() == ids).all()
    assert (model.memory.example_ids != torch.arange(len(model.memory))).any()
    np.testing.assert_allclose(out.neighbor_distances.numpy(), d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.neighbor_weights.numpy(), w, atol=1e-6)
    np.testing.assert_allclose(out.neighbor_residuals.numpy(), r_pred, atol=1e-6)
    np.testing.assert_allclose(out.neighbor_contributions.numpy(), contrib, atol=1e-6)
    assert (out.neighbor_labels.numpy() == labels).all()


def test_image_contributions_sum_to_residual_at_prediction(image_model, queries):
    model, _ = image_model
    out = model(pixel_values=queries, output_neighbors=True)
    pred = out.scores.argmax(-1, keepdim=True)  # (B, 1)
    total = out.neighbor_contributions.sum(-1)  # (B,)
    torch.testing.assert_close(total, out.residual.gather(-1, pred).squeeze(-1), atol=1e-6, rtol=0)
    # ... and so the score is the base probability plus the contributions.
    base_p = torch.softmax(out.base_logits / T, -1).gather(-1, pred).squeeze(-1)
    torch.testing.assert_close(out.scores.gather(-1, pred).squeeze(-1), base_p + total, atol=1e-6, rtol=0)


def test_output_neighbors_off_is_unchanged_and_searches_once(image_model, queries, monkeypatch):
    model, _ = image_model
    calls = []
    search = type(model.memory).search
    monkeypatch.setattr(type(model.memory), "search", lambda self, *a, **kw: calls.append(1) or search(self, *a, **kw))
    off = model(pixel_values=queries)
    assert len(calls) == 1
    on = model(pixel_values=queries, output_neighbors=True)
    assert len(calls) == 2  # the neighbours come from the forward's own search, not a second one
    for name in ("scores", "logits", "base_logits", "residual"):
        assert torch.equal(getattr(off, name), getattr(on, name)), name
    assert all(getattr(off, name) is None for name in FIELDS + ("neighbor_residuals", "neighbor_labels"))
    assert len(off.to_tuple()) == 4  # logits, scores, base_logits, residual: nothing added when off


def test_on_disk_memory_gives_the_same_neighbors(image_model, queries, tmp_path):
    model, data = image_model
    in_ram = model(pixel_values=queries, output_neighbors=True)
    disk = ResMemWrapper.from_base(make_base("resnet", seed=1), k=K, sigma=SIGMA, temperature=T)
    disk.build_memory_on_disk(data, str(tmp_path / "memory"), progress=False)
    out = disk(pixel_values=queries, output_neighbors=True)
    assert torch.equal(out.scores, disk(pixel_values=queries).scores)
    full = ResMemWrapper.from_base(make_base("resnet", seed=1), k=K, sigma=SIGMA, temperature=T)
    full.build_memory(data, progress=False)
    ref = full(pixel_values=queries, output_neighbors=True)  # the same memory in RAM (nothing removed)
    for name in FIELDS + ("neighbor_labels",):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    assert in_ram.neighbor_ids.shape == out.neighbor_ids.shape


def test_explain_ranks_by_contribution_and_attaches_rows(image_model, queries):
    model, data = image_model
    out = model(pixel_values=queries, output_neighbors=True)
    explanations = model.explain(queries, dataset=data, top=3)
    assert len(explanations) == 6 and all(isinstance(e, Explanation) for e in explanations)
    pred, ids, _, _, _, contrib, _, residual = image_reference(model, queries)
    labels = np.asarray(data["label"][:])
    for b, e in enumerate(explanations):
        order = np.argsort(-np.abs(contrib[b]), kind="stable")[:3]  # numpy ranking by |contribution|
        assert [n.example_id for n in e.neighbors] == ids[b, order].tolist()
        np.testing.assert_allclose([n.contribution for n in e.neighbors], contrib[b, order], atol=1e-6)
        assert e.predicted == pred[b] and e.base_predicted == out.base_logits[b].argmax().item()
        assert e.predicted_label == model.config.id2label[e.predicted]
        np.testing.assert_allclose(e.residual, residual[b, pred[b]], atol=1e-6)  # all k, not only the top 3
        np.testing.assert_allclose(e.score - e.base_probability, e.residual, atol=1e-6)
        for n in e.neighbors:
            assert n.label == labels[n.example_id] == n.row["label"]  # the training row the entry came from
            np.testing.assert_array_equal(np.asarray(n.row["pixel_values"]), np.asarray(data[n.example_id]["pixel_values"]))
            np.testing.assert_allclose(n.contribution, n.weight * n.residual, atol=1e-7)
        assert e.pixel_values.shape == (3, 16, 16)


def test_explain_takes_dataset_rows_like_build_memory(image_model):
    """`model.explain(test_rows, dataset=train)`: the rows are read the way build_memory reads data, giving the same
    explanations as their pixel_values tensor."""
    model, data = image_model
    rows = make_pixel_dataset(5, seed=91)
    pixels = torch.tensor(np.asarray(rows["pixel_values"][:]), dtype=torch.float32)
    from_rows, from_tensor = model.explain(rows, dataset=data, top=3), model.explain(pixels, dataset=data, top=3)
    assert len(from_rows) == 5
    for a, b in zip(from_rows, from_tensor):
        assert (a.predicted, a.base_predicted) == (b.predicted, b.base_predicted)
        assert [n.example_id for n in a.neighbors] == [n.example_id for n in b.neighbors]
        np.testing.assert_allclose([n.contribution for n in a.neighbors], [n.contribution for n in b.neighbors], atol=1e-6)


def test_explain_errors_name_the_fix(image_model, queries):
    model, data = image_model
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        model.explain(queries, top=0)
    with pytest.raises(ValueError, match="outside the dataset .* pass the training dataset the memory was built from"):
        model.explain(queries, dataset=data.select(range(3)))
    with pytest.raises(TypeError, match="explain\\(\\) takes a tensor of pixel_values"):
        model.explain([1, 2, 3])
    with pytest.raises(ValueError, match="needs the neighbours' images: pass dataset="):
        plot_explanation(model.explain(queries[:1]), "unused.png")


# ---------------------------------------------------------------------------------------------------- causal LMs


@pytest.fixture(scope="module", params=[8, None], ids=["sparse-top8", "dense"])
def lm_model(request):
    """A tiny GPT-2 with a memory over 3 token sequences (a datasets.Dataset of input_ids), top-m sparse or dense."""
    seqs = distinct_sequences(3, 30, seed=0)
    data = datasets.Dataset.from_dict({"input_ids": seqs.tolist()})
    model = ResMemWrapper.from_base(tiny_base("gpt2", seed=3), k=K, sigma=SIGMA, temperature=T)
    model.build_memory(data, window=WINDOW, stride=STRIDE, residual_top_m=request.param, batch_size=4, progress=False)
    return model, data


def lm_reference(model, ids):
    """`(pred (Q,), example ids, positions, labels, distances, weights, residual at pred, contributions)`, `(Q, k)`
    each, from the memory's tensors: the stored (sparse) residuals densified in numpy, brute-force distances."""
    memory = model.memory
    n, vocab = len(memory), model.vocab_size
    dense = np.zeros((n, vocab))
    values = memory.values.double().numpy()  # (N, m) float16 as stored
    if memory.dense:
        dense[:] = values
    else:
        dense[np.arange(n)[:, None], memory.indices.long().numpy()] = values  # 0 outside each entry's top m
    q_keys, q_logits = hook_keys(model.base, model.config.layer, ids)  # (B, T, D), (B, T, V)
    q_keys, q_logits = q_keys.reshape(-1, q_keys.shape[-1]), q_logits.reshape(-1, vocab)
    d, rows = np_knn(q_keys, memory.keys.double().numpy(), K)  # (Q, k)
    w = np_softmax(-d / SIGMA)
    pred = (np_softmax(q_logits / T) + (w[:, :, None] * dense[rows]).sum(1)).argmax(1)  # (Q,)
    r_pred = dense[rows, pred[:, None]]  # (Q, k)
    mem = {name: getattr(memory, name).numpy()[rows] for name in ("example_ids", "positions", "labels")}
    return pred, mem["example_ids"], mem["positions"], mem["labels"], d, w, r_pred, w * r_pred


def test_lm_neighbors_match_numpy(lm_model):
    model, _ = lm_model
    ids = distinct_sequences(2, 10, seed=5)
    out = model(ids, output_neighbors=True)
    assert out.neighbor_contributions.shape == out.neighbor_positions.shape == (2, 10, K)
    pred, example_ids, positions, labels, d, w, r_pred, contrib = lm_reference(model, ids)
    names = FIELDS + ("neighbor_positions", "neighbor_labels", "neighbor_residuals")
    flat = {name: getattr(out, name).reshape(-1, K).numpy() for name in names}  # (B*T, k) each
    assert (out.scores.argmax(-1).reshape(-1).numpy() == pred).all()
    assert (flat["neighbor_ids"] == example_ids).all() and (flat["neighbor_positions"] == positions).all()
    assert (flat["neighbor_labels"] == labels).all()
    np.testing.assert_allclose(flat["neighbor_distances"], d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat["neighbor_weights"], w, atol=1e-6)
    np.testing.assert_allclose(flat["neighbor_residuals"], r_pred, atol=1e-6)
    np.testing.assert_allclose(flat["neighbor_contributions"], contrib, atol=1e-6)
    if not model.memory.dense:  # the sparse case must include tokens outside an entry's top m (residual 0)
        assert (r_pred == 0).any() and (r_pred != 0).any()


def test_lm_contributions_sum_to_residual_and_off_is_unchanged(lm_model):
    model, _ = lm_model
    ids = distinct_sequences(2, 10, seed=6)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: no neighbours there
    off = model(ids, attention_mask=mask)
    on = model(ids, attention_mask=mask, output_neighbors=True)
    for name in ("scores", "logits", "base_logits", "residual"):
        assert torch.equal(getattr(off, name), getattr(on, name)), name
    assert all(getattr(off, name) is None for name in FIELDS + ("neighbor_positions",))
    pred = on.scores.argmax(-1, keepdim=True)  # (B, T, 1)
    torch.testing.assert_close(
        on.neighbor_contributions.sum(-1), on.residual.gather(-1, pred).squeeze(-1), atol=1e-6, rtol=0
    )
    padded = on.neighbor_ids[1, 7:]
    assert (padded == -1).all() and (on.neighbor_positions[1, 7:] == -1).all()
    assert torch.isinf(on.neighbor_distances[1, 7:]).all() and (on.neighbor_contributions[1, 7:] == 0).all()
    # logits_to_keep: neighbours of the kept positions only, still from the same search.
    last = model(ids, attention_mask=mask, output_neighbors=True, logits_to_keep=1)
    assert last.neighbor_ids.shape == (2, 1, K) and torch.equal(last.neighbor_ids[0, 0], on.neighbor_ids[0, -1])


def test_lm_explain_last_position_and_rows(lm_model):
    model, data = lm_model
    ids = distinct_sequences(2, 10, seed=7)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask, output_neighbors=True)
    explanations = model.explain({"input_ids": ids, "attention_mask": mask}, dataset=data, top=3)
    assert [(e.query, e.position) for e in explanations] == [(0, 9), (1, 5)]  # each query's last real token
    for e in explanations:
        contrib = out.neighbor_contributions[e.query, e.position].numpy()
        order = np.argsort(-np.abs(contrib), kind="stable")[:3]
        assert [n.example_id for n in e.neighbors] == out.neighbor_ids[e.query, e.position][order].tolist()
        assert e.predicted == out.scores[e.query, e.position].argmax().item()
        np.testing.assert_allclose(e.residual, contrib.sum(), atol=1e-6)
        for n in e.neighbors:
            # The entry at position t of its example stores the next token t + 1 of that training row.
            assert n.row["input_ids"][n.position + 1] == n.label
    # Tokens decoded with tokenizer=; without the dense residual, residual[c] is the sum of the contributions.
    named = model.explain(ids, top=2, tokenizer=word_tokenizer(VOCAB - 2), output_residual=False)[0]
    assert named.predicted_label == f"w{named.predicted}" and named.neighbors[0].label_name == f"w{named.neighbors[0].label}"
    np.testing.assert_allclose(named.residual, out.neighbor_contributions[0, -1].sum().item(), atol=1e-6)
    every = model.explain({"input_ids": ids, "attention_mask": mask}, top=1, positions="all")
    assert [(e.query, e.position) for e in every] == [(0, t) for t in range(10)] + [(1, t) for t in range(6)]
    with pytest.raises(ValueError, match="positions must be 'last', 'all', or integer positions"):
        model.explain(ids, positions=10)


# ---------------------------------------------------------------------------------------------------- the figure


def test_plot_explanation_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    images = make_image_dataset(20, seed=2)

    def transform(batch):  # PIL images -> (B, 3, H, W) in [-1, 1]
        return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in batch])

    model = ResMemWrapper.from_base(make_base("handwritten", seed=2), k=4, sigma=0.5)
    model.build_memory(images, transform=transform, image_column="image", progress=False)
    queries = transform(make_image_dataset(3, seed=9)["image"][:])
    explanations = model.explain(queries, top=3)
    path = tmp_path / "explained.png"
    assert plot_explanation(explanations, str(path), dataset=images) == str(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100  # 3 rows of 1 + 3 panels
    assert os.listdir(tmp_path) == ["explained.png"]  # written to a temporary name, then renamed
    # With rows attached by explain(dataset=...) no dataset is needed.
    plot_explanation(model.explain(queries, dataset=images, top=2)[0], str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="causal LM"):
        plot_explanation([Explanation(0, 3, 1, None, 1, None, 0.5, 0.5, 0.0)], str(tmp_path / "x.png"))
