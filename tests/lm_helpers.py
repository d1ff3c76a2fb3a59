"""Tiny causal LMs, a word-level tokenizer and an independent numpy ResMem for the causal-LM tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

VOCAB = 128
HIDDEN = 32


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=16, **common)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=16, **common)
    raise ValueError(arch)


ARCHS = ["gpt2", "llama", "qwen3", "mistral", "gemma2"]
EXPECTED_LAYER = {
    "gpt2": "transformer.h.1.ln_2",
    "llama": "model.layers.1.post_attention_layernorm",
    "qwen3": "model.layers.1.post_attention_layernorm",
    "mistral": "model.layers.1.post_attention_layernorm",
    "gemma2": "model.layers.1.pre_feedforward_layernorm",
}


def tiny_base(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def word_tokenizer(n: int, shift: int = 0):
    """A word-level fast tokenizer over words `w0..w{n-1}` (ids shifted by `shift` mod n) plus [UNK] and [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": (i + shift) % n for i in range(n)}
    vocab["[UNK]"], vocab["[PAD]"] = n, n + 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def distinct_sequences(n_seq: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token sequences whose first tokens differ (so no two stored contexts are identical)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_seq, length), generator=g)
    ids[:, 0] = torch.randperm(VOCAB - 3, generator=g)[:n_seq] + 3
    return ids


# ---------------------------------------------------------------------- independent numpy reference
def hook_keys(base, layer: str, ids: torch.Tensor):
    """Keys from a plain torch forward hook on `layer` (no resmem code): `(B, T, D)` float64, logits `(B, T, V)`."""
    module = dict(base.named_modules())[layer]
    seen = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))
    try:
        with torch.no_grad():
            logits = base(input_ids=ids).logits
    finally:
        handle.remove()
    return seen["h"].double().numpy(), logits.double().numpy()


def reference_entries(base, layer, sequences, window, stride):
    """Entries of the memory by an independent rule: position t (with a next token) belongs to window
    0 if t < window, else to window i = (t - window) // stride + 1 starting at i * stride."""
    keys, logits, labels = [], [], []
    for seq in sequences:
        seq = list(seq)
        length = len(seq)
        forwards = {}
        for t in range(length - 1):
            start = 0 if t < window else ((t - window) // stride + 1) * stride
            end = min(start + window, length)
            if (start, end) not in forwards:
                forwards[start, end] = hook_keys(base, layer, torch.tensor([seq[start:end]]))
            h, lg = forwards[start, end]
            keys.append(h[0, t - start])
            logits.append(lg[0, t - start])
            labels.append(seq[t + 1])
    return np.stack(keys), np.stack(logits), np.array(labels)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_scores(mem_keys, mem_logits, mem_labels, q_keys, q_logits, k, sigma, temperature, top_m):
    """ResMem scores in numpy: residuals at build T, top-m by magnitude in float16, soft-kNN over plain L2."""
    n, v = mem_logits.shape
    r = -np_softmax(mem_logits / temperature)
    r[np.arange(n), mem_labels] += 1.0
    if top_m is not None:
        sparse = np.zeros_like(r)
        cols = np.argsort(-np.abs(r), axis=1)[:, :top_m]
        sparse[np.arange(n)[:, None], cols] = r[np.arange(n)[:, None], cols]
        r = sparse
    r = r.astype(np.float16).astype(np.float64)
    d = np.sqrt(((q_keys[:, None, :] - mem_keys[None, :, :]) ** 2).sum(-1))  # (Q, N)
    nn_idx = np.argsort(d, axis=1)[:, :k]
    nd = np.take_along_axis(d, nn_idx, axis=1)
    w = np_softmax(-nd / sigma)
    residual = np.einsum("qk,qkv->qv", w, r[nn_idx])
    return np_softmax(q_logits / temperature) + residual


def cached_and_uncached_greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(generated, loop)`: `model.generate` greedy with its KV cache, and a plain loop of uncached forwards taking
    the argmax of `scores` at the last position; both `(B, P + steps)` token ids, equal when the cached path is right."""
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids, use_cache=False).scores[:, -1].argmax(-1)
            ids = torch.cat([ids, next_token[:, None]], 1)
    return generated, ids


def run_smollm2_recipe_smoke(tmp_path, script: str, *extra: str) -> dict:
    """Run `recipes/causal_lm/<script>` on a tiny saved Llama with a word tokenizer, a 40-story word corpus and a
    cross-domain file of other words (300 memory tokens, 60 per split, windows 32 / 24); return its results JSON
    (also written to `tmp_path / "results" / "r.json"`, markdown beside it)."""
    import importlib.util
    import json
    from pathlib import Path

    tok = word_tokenizer(100)
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(3)
    stories = [" ".join(f"w{int(i)}" for i in torch.randint(0, 12, (14,), generator=g)) for _ in range(40)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(stories) + "\n")
    (tmp_path / "cross.txt").write_text("\n".join(" ".join(f"w{i}" for i in range(j, j + 10)) for j in range(50, 80)) + "\n")
    path = Path(__file__).resolve().parent.parent / "recipes" / "causal_lm" / script
    spec = importlib.util.spec_from_file_location("recipe_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "results" / "r.json"
    threads = torch.get_num_threads()
    try:
        module.main(["--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "corpus.txt"), "--cross",
                     str(tmp_path / "cross.txt"), "--memory-tokens", "300", "--val-tokens", "60", "--test-tokens", "60",
                     "--cross-tokens", "60", "--window", "32", "--stride", "24", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())
