"""ResMemForCausalLM on tiny GPT-2, Llama, Qwen3, Mistral and Gemma2 models (no downloads)."""

import numpy as np
import pytest
import torch
from lm_helpers import (
    ARCHS,
    EXPECTED_LAYER,
    VOCAB,
    cached_and_uncached_greedy,
    distinct_sequences,
    hook_keys,
    reference_entries,
    reference_scores,
    tiny_base,
    word_tokenizer,
)
from transformers import AutoModelForCausalLM

import resmem
from resmem import ResMemForCausalLM, ResMemWrapper
from resmem.data_lm import plan_windows

WINDOW, STRIDE = 12, 8


@pytest.fixture(scope="module", params=ARCHS)
def built(request):
    """(arch, base, wrapper with a sparse memory over 3 sequences of 30 tokens, sequences)."""
    base = tiny_base(request.param)
    model = ResMemWrapper.from_base(base, k=4, sigma=0.5, temperature=1.3)
    seqs = distinct_sequences(3, 30)
    model.build_memory(seqs, window=WINDOW, stride=STRIDE, residual_top_m=16, batch_size=4)
    return request.param, base, model, seqs


def test_wrapper_type_and_default_layer(built):
    arch, base, model, _ = built
    assert isinstance(model, ResMemForCausalLM) and model.can_generate()
    assert not resmem.ResMemForImageClassification.can_generate()
    assert model.config.layer == EXPECTED_LAYER[arch]


def test_wrapped_base_logits_equal_unwrapped_exactly(built):
    _, base, model, seqs = built
    with torch.no_grad():
        out = model(seqs)
        ref = base(seqs).logits
    assert torch.equal(out.base_logits, ref)
    assert out.scores.shape == out.logits.shape == out.residual.shape == (3, 30, VOCAB)


def test_memory_entries_follow_windows(built):
    _, _, model, seqs = built
    mem = model.memory
    assert len(mem) == 3 * 29  # every position with a next token, each exactly once
    for ex in range(3):
        sel = mem.example_ids == ex
        assert torch.equal(mem.positions[sel].sort().values, torch.arange(29))
        order = mem.positions[sel].argsort()
        assert torch.equal(mem.labels[sel][order], seqs[ex, 1:])
    assert mem.values.dtype == torch.float16 and mem.indices.dtype == torch.int32 and mem.values.shape[1] == 16
    assert mem.bytes_per_entry() == HIDDEN_BYTES(model) + 16 * 2 + 16 * 4 + 3 * 8


def HIDDEN_BYTES(model):
    return model.memory.keys.shape[1] * 4


def test_plan_windows_context():
    for length in (2, 5, 12, 13, 20, 21, 37):
        covered = []
        for start, end, store_from in plan_windows(length, WINDOW, STRIDE):
            entries = [t for t in range(store_from, end) if t < length - 1]
            assert all(t - start >= WINDOW - STRIDE for t in entries if start > 0)
            covered += entries
        assert covered == list(range(length - 1))


_REFERENCE = {}


@pytest.mark.parametrize("top_m", [16, None])
def test_scores_match_independent_numpy(built, top_m):
    arch, base, model, seqs = built
    if top_m is None:
        model.build_memory(seqs, window=WINDOW, stride=STRIDE, residual_top_m=None)
    layer = EXPECTED_LAYER[arch]
    if arch not in _REFERENCE:
        _REFERENCE[arch] = reference_entries(base, layer, seqs.tolist(), WINDOW, STRIDE)
    mem_keys, mem_logits, mem_labels = _REFERENCE[arch]
    queries = distinct_sequences(2, 10, seed=1)
    q_keys, q_logits = hook_keys(base, layer, queries)
    expected = reference_scores(
        mem_keys, mem_logits, mem_labels, q_keys.reshape(-1, q_keys.shape[-1]), q_logits.reshape(-1, VOCAB),
        k=4, sigma=0.5, temperature=1.3, top_m=top_m,
    ).reshape(2, 10, VOCAB)
    with torch.no_grad():
        out = model(queries)
    np.testing.assert_allclose(out.scores.double().numpy(), expected, atol=2e-5)
    # logits: log(renormalise(clamp(scores, floor)))
    clamped = np.clip(expected, 1e-8, None)
    np.testing.assert_allclose(out.logits.double().exp().numpy(), clamped / clamped.sum(-1, keepdims=True), atol=2e-5)
    if top_m is None:
        model.build_memory(seqs, window=WINDOW, stride=STRIDE, residual_top_m=16)


def test_exact_memorisation_with_k1(built):
    _, _, model, seqs = built
    model.config.k, model.config.sigma = 1, 1e-3
    try:
        hits = []
        with torch.no_grad():
            for start, end, store_from in plan_windows(30, WINDOW, STRIDE):
                scores = model(seqs[:, start:end]).scores  # (3, w, V)
                stored = slice(store_from - start, min(end, 29) - start)
                hits.append(scores.argmax(-1)[:, stored] == seqs[:, store_from + 1 : min(end, 29) + 1])
        assert torch.cat(hits, 1).all()
    finally:
        model.config.k, model.config.sigma = 4, 0.5


def test_logits_to_keep_and_padding(built):
    _, _, model, _ = built
    a, b = distinct_sequences(2, 9, seed=3)
    b = b[:6]
    with torch.no_grad():
        ref_a, ref_b = model(a[None]).scores[0], model(b[None]).scores[0]
        last = model(a[None], logits_to_keep=1)
        assert last.scores.shape == (1, 1, VOCAB)
        torch.testing.assert_close(last.scores[0, 0], ref_a[-1], atol=1e-6, rtol=0)
        for side in ("right", "left"):
            ids = torch.zeros(2, 9, dtype=torch.long)
            mask = torch.zeros(2, 9, dtype=torch.long)
            ids[0], mask[0] = a, 1
            cols = slice(0, 6) if side == "right" else slice(3, 9)
            ids[1, cols], mask[1, cols] = b, 1
            out = model(ids, attention_mask=mask)
            torch.testing.assert_close(out.scores[0], ref_a, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.scores[1, cols], ref_b, atol=1e-5, rtol=0)
            pad_cols = torch.ones(9, dtype=torch.bool)
            pad_cols[cols] = False
            assert (out.residual[1, pad_cols] == 0).all()  # no kNN at padded positions


def test_loss_is_nll_of_logits(built):
    _, _, model, seqs = built
    with torch.no_grad():
        out = model(seqs[:1, :10], labels=seqs[:1, :10])
    expected = -out.logits[0, :-1].gather(1, seqs[0, 1:10, None]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_save_load_through_auto_class(built, tmp_path):
    _, _, model, seqs = built
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded, ResMemForCausalLM) and len(loaded.memory) == len(model.memory)
    assert loaded.memory.top_m == 16 and loaded.memory.temperature == 1.3
    with torch.no_grad():
        assert torch.equal(loaded(seqs).scores, model(seqs).scores)


def test_mixture_distribution(built):
    _, _, model, seqs = built
    with torch.no_grad():
        clamp = model(seqs[:1])
        model.config.distribution, model.config.mixture_lambda = "mixture", 0.3
        try:
            mix = model(seqs[:1])
        finally:
            model.config.distribution = "clamp"
    assert torch.equal(mix.scores, clamp.scores)
    p = mix.logits.exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 30), atol=1e-5, rtol=0)
    positive = clamp.scores.clamp_min(0)
    expected = 0.7 * positive / positive.sum(-1, keepdim=True) + 0.3 * clamp.base_logits.softmax(-1)
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- generate
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generate_with_cache_equals_uncached_loop(arch):
    model = ResMemWrapper.from_base(tiny_base(arch), k=3, sigma=1.0)
    model.build_memory(distinct_sequences(4, 24), window=WINDOW, stride=STRIDE)
    prompt = distinct_sequences(2, 5, seed=7)
    generated, ids = cached_and_uncached_greedy(model, prompt, 8)
    assert torch.equal(generated, ids)


def test_sampling_and_beam_search_run():
    model = ResMemWrapper.from_base(tiny_base("llama"), k=3, sigma=1.0, temperature=1.3)
    assert model.generation_config.temperature in (None, 1.0)  # ResMem's T is not the sampling temperature
    model.build_memory(distinct_sequences(4, 24), window=WINDOW, stride=STRIDE)
    prompt = distinct_sequences(2, 5, seed=7)
    mask = torch.ones_like(prompt)
    torch.manual_seed(0)
    sampled = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, eos_token_id=None, pad_token_id=0)
    beams = model.generate(prompt, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert sampled.shape == beams.shape == (2, 11)
    assert torch.equal(sampled[:, :5], prompt) and torch.equal(beams[:, :5], prompt)


def test_build_from_text_dataset_with_tokenizer():
    from datasets import Dataset

    tok = word_tokenizer(100)
    model = ResMemWrapper.from_base(tiny_base("llama"), k=2, sigma=1.0)
    texts = ["w5 w6 w7 w8 w9", "w3", "w10 w11 w12", ""]
    model.build_memory(Dataset.from_dict({"text": texts}), tokenizer=tok, window=WINDOW, stride=STRIDE)
    assert len(model.memory) == 4 + 2
    assert model.memory_stats["skipped"] == 2
    assert sorted(set(model.memory.example_ids.tolist())) == [0, 2]
    assert model.memory.tokenizer_hash
    model.check_tokenizer(tok)  # same tokenizer: fine
