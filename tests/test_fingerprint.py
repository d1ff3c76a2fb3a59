"""Base-weight fingerprints: a cheap sampled value ("v2:") that still catches every whole-tensor change,
and memories saved with the pre-v2 full hash that still load."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import make_base, make_pixel_dataset
from lm_helpers import distinct_sequences
from safetensors import safe_open
from safetensors.torch import save_file

import resmem  # noqa: F401  registers the Auto classes
from resmem import MemoryFileError, ResMemWrapper
from resmem.hub import (
    FINGERPRINT_BLOCK,
    FINGERPRINT_STRIDED,
    FINGERPRINT_WHOLE,
    MEMORY_FILE,
    _sample_rows,
    base_fingerprint,
    fingerprint_matches,
    legacy_base_fingerprint,
)

SAMPLE = FINGERPRINT_WHOLE
# Large enough that the embedding (600 x 64), lm_head and MLP matrices (64 x 176) are sampled, not hashed
# whole (> SAMPLE elements), while k_proj (64 x 32) and the norms are hashed whole: both paths are tested.
MID = dict(vocab_size=600, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
SAMPLED = "model.layers.1.mlp.down_proj.weight"
WHOLE = "model.layers.0.self_attn.k_proj.weight"


def mid_lm(seed: int = 0) -> tf.LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**MID)).eval()


def param(model, name) -> torch.nn.Parameter:
    return dict(model.named_parameters())[name]


@pytest.fixture(scope="module")
def lm():
    return mid_lm(0)


def test_the_test_model_exercises_both_paths(lm):
    sizes = {name: t.numel() for name, t in lm.state_dict().items()}
    assert sizes[SAMPLED] > SAMPLE and sizes["lm_head.weight"] > SAMPLE and sizes[WHOLE] <= SAMPLE


def test_fingerprint_is_versioned_and_deterministic(lm):
    fp = base_fingerprint(lm)
    assert fp.startswith("v2:") and len(fp) == len("v2:") + 64
    assert base_fingerprint(lm) == fp
    assert not legacy_base_fingerprint(lm).startswith("v2:")


def test_identical_weights_give_identical_fingerprints(lm, tmp_path):
    assert base_fingerprint(mid_lm(0)) == base_fingerprint(lm)
    assert base_fingerprint(mid_lm(1)) != base_fingerprint(lm)
    lm.save_pretrained(tmp_path / "base")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base_fingerprint(loaded) == base_fingerprint(lm)
    assert legacy_base_fingerprint(loaded) == legacy_base_fingerprint(lm)


def test_fingerprint_depends_on_values_not_memory_layout(lm):
    other = mid_lm(0)
    with torch.no_grad():  # same values, stored transposed (a non-contiguous view of a contiguous tensor)
        p = param(other, SAMPLED)
        p.data = p.data.t().contiguous().t()
    assert not param(other, SAMPLED).is_contiguous()
    assert base_fingerprint(other) == base_fingerprint(lm)


@pytest.mark.parametrize("name", [SAMPLED, WHOLE, "lm_head.weight", "model.norm.weight"])
def test_optimizer_step_on_one_parameter_is_detected(lm, name):
    model = mid_lm(0).train()
    for n, p in model.named_parameters():
        p.requires_grad_(n == name)
    optimizer = torch.optim.AdamW([param(model, name)], lr=1e-4, weight_decay=0.0)
    ids = distinct_sequences(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = (param(model, name) != param(lm, name)).float().mean().item()
    assert changed > 0.5  # a whole-tensor change (the case the fingerprint promises to catch)
    assert base_fingerprint(model) != base_fingerprint(lm)


@pytest.mark.parametrize("name", [SAMPLED, WHOLE])
def test_merged_low_rank_delta_is_detected(lm, name):
    model = mid_lm(0)
    weight = param(model, name)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(weight.shape[0], 4, generator=g) * 1e-3  # (out, r) LoRA-like factors, rank 4
    a = torch.randn(4, weight.shape[1], generator=g) * 1e-3  # (r, in)
    with torch.no_grad():
        weight += b @ a  # merged delta of magnitude ~1e-5 next to weights of magnitude ~1e-2
    assert base_fingerprint(model) != base_fingerprint(lm)


def test_swapped_reinitialised_or_scaled_head_is_detected(lm):
    reference = base_fingerprint(lm)
    swapped = mid_lm(0)
    swapped.lm_head.load_state_dict(mid_lm(1).lm_head.state_dict())
    assert base_fingerprint(swapped) != reference
    reinit = mid_lm(0)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        torch.nn.init.normal_(reinit.lm_head.weight, std=0.02)
    assert base_fingerprint(reinit) != reference
    scaled = mid_lm(0)
    with torch.no_grad():
        param(scaled, SAMPLED).mul_(1.001)
    assert base_fingerprint(scaled) != reference


def test_dtype_change_is_detected(lm):
    fingerprints = {base_fingerprint(mid_lm(0).to(dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert len(fingerprints) == 3 and base_fingerprint(lm) in fingerprints


def test_sampled_rows_are_fixed_spread_and_in_range():
    assert _sample_rows("w", FINGERPRINT_WHOLE) is None  # small tensors are hashed whole
    n = 10_000_019
    rows, n_rows = _sample_rows("w", n), n // FINGERPRINT_BLOCK
    assert rows.dtype == np.int64 and rows.min() >= 0 and rows.max() < n_rows
    strided = rows[:FINGERPRINT_STRIDED]
    assert strided[0] == 0 and strided[-1] == n_rows - 1
    gap = n_rows // (FINGERPRINT_STRIDED - 1)
    assert np.diff(strided).min() >= gap - 1 and np.diff(strided).max() <= gap + 1  # evenly spread
    _sample_rows.cache_clear()
    assert np.array_equal(rows, _sample_rows("w", n))  # recomputed: deterministic, not from torch's RNG state
    assert not np.array_equal(rows[FINGERPRINT_STRIDED:], _sample_rows("v", n)[FINGERPRINT_STRIDED:])  # name-derived


def test_fingerprint_reads_a_sample_not_every_byte(lm):
    """The cost is O(sample): a 1-element change outside the sampled blocks of a large tensor is NOT seen
    by the v2 value (the documented trade-off), but is by the full legacy hash; one inside a block is."""
    weight = param(lm, SAMPLED)
    n, b = weight.numel(), FINGERPRINT_BLOCK
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled.view(-1, b)[torch.from_numpy(_sample_rows(SAMPLED, n).copy())] = True  # (n // b, b): n is a multiple of b here
    sampled[n - b :] = True
    assert sampled.float().mean() < 0.5
    reference, legacy = base_fingerprint(lm), legacy_base_fingerprint(lm)
    for position, seen in ((int((~sampled).nonzero()[0]), False), (int(sampled.nonzero()[5]), True)):
        model = mid_lm(0)
        with torch.no_grad():
            param(model, SAMPLED).view(-1)[position] += 1.0
        assert (base_fingerprint(model) != reference) == seen
        assert legacy_base_fingerprint(model) != legacy


def test_device_path_gives_the_same_fingerprint(lm, monkeypatch):
    """Accelerator tensors take the torch path (index_select on the device, one copy per device); run it on
    CPU tensors: same bytes, same value as the numpy path."""
    import functools

    import resmem.hub as hub

    reference = base_fingerprint(lm)
    for name, t in lm.state_dict().items():
        host = np.concatenate([np.asarray(p).reshape(-1) for p in hub._sample(name, t)])
        device = torch.cat([p.reshape(-1) for p in hub._sample(name, t, on_host=False)]).numpy()
        assert np.array_equal(host, device), name
    monkeypatch.setattr(hub, "_sample", functools.partial(hub._sample, on_host=False))
    assert base_fingerprint(lm) == reference


def test_fingerprint_matches_routes_by_version(lm):
    other = mid_lm(1)
    assert fingerprint_matches(lm, base_fingerprint(lm)) and not fingerprint_matches(other, base_fingerprint(lm))
    assert fingerprint_matches(lm, legacy_base_fingerprint(lm)) and not fingerprint_matches(other, legacy_base_fingerprint(lm))
    for stored in ("", None, "synthetic", "v9:" + "0" * 64, base_fingerprint(lm)[3:].upper()):
        assert not fingerprint_matches(lm, stored)


# ------------------------------------------------------------------ memories saved by earlier versions
def _rewrite_fingerprint(path: str, value: str) -> None:
    """Write `value` as the stored fingerprint of a saved memory file (as resmem-hf < v2 wrote it)."""
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    metadata["fingerprint"] = value
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _image_model():
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=3, sigma=0.8)
    model.build_memory(make_pixel_dataset(20, seed=0), batch_size=10)
    return model


def _lm_model():
    model = ResMemWrapper.from_base(mid_lm(0), k=3, sigma=1.0)
    model.build_memory(distinct_sequences(2, 12), window=12, stride=8)
    return model


@pytest.mark.parametrize("build", [_image_model, _lm_model], ids=["image", "causal-lm"])
def test_memory_saved_with_a_legacy_fingerprint_still_loads(tmp_path, build):
    model = build()
    assert model.memory.fingerprint == base_fingerprint(model.base)
    model.save_pretrained(tmp_path / "m")
    _rewrite_fingerprint(str(tmp_path / "m" / MEMORY_FILE), legacy_base_fingerprint(model.base))
    loaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert len(loaded.memory) == len(model.memory)
    # Upgraded once it matched: later save / add checks use the cheap value.
    assert loaded.memory.fingerprint == base_fingerprint(loaded.base)
    loaded.save_pretrained(tmp_path / "again")
    assert len(ResMemWrapper.from_pretrained(tmp_path / "again").memory) == len(model.memory)


def test_legacy_fingerprint_of_other_weights_is_refused(tmp_path):
    model = _image_model()
    model.save_pretrained(tmp_path / "m")
    _rewrite_fingerprint(str(tmp_path / "m" / MEMORY_FILE), legacy_base_fingerprint(make_base("resnet", seed=1)))
    with pytest.raises(MemoryFileError, match="check_memory_fingerprint=False"):
        ResMemWrapper.from_pretrained(tmp_path / "m")


def test_save_refuses_after_a_merged_delta(tmp_path):
    model = _lm_model()
    with torch.no_grad():
        param(model.base, SAMPLED).add_(torch.full_like(param(model.base, SAMPLED), 1e-4))
    with pytest.raises(ValueError, match="build_memory"):
        model.save_pretrained(tmp_path / "never")
    assert not os.path.exists(tmp_path / "never")
