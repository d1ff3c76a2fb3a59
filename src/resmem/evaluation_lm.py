"""Evaluation of a causal-LM ResMem on held-out text: next-token accuracy, perplexity, TPR/FPR/Gain.

Evaluated positions follow the memory's windowing (every position with a next token; after the
first window each has at least `window - stride` tokens of context). One base forward per batch
of windows serves a whole grid of `(k, sigma)` and mixture weights `lam`: the neighbours are
searched once with the largest `k`.

Perplexities reported:
- `base_ppl`: the base model, `softmax(f(x))`.
- `ppl_clamp`: ResMem's `logits` in the default mode, `renormalise(clamp(scores, score_floor))`.
  The true token often receives a negative score from its neighbours and is clamped to the floor,
  so this perplexity can be far worse than the base model's even when accuracy improves.
- `ppl_mixture[lam]`: the proper distribution `(1 - lam) * renormalise(clamp(scores, 0)) + lam * softmax(f(x))`
  (`config.distribution = "mixture"`), with `lam` to be tuned on validation text.

Command line (the lead wires it into `resmem eval`):

    python -m resmem.evaluation_lm --model <saved ResMem folder> --data test.txt.gz --max-tokens 20000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch

from .residuals import neighbour_weights, sparse_weighted_residual

DEFAULT_LAMBDAS = (0.1, 0.25, 0.5, 0.75, 0.9)


class _Accumulator:
    """Running sums for one `(k, sigma)` setting."""

    def __init__(self, lambdas):
        self.n = 0
        self.base_correct = self.correct = self.tp = self.fp = 0
        self.base_nll = self.clamp_nll = 0.0
        self.mix_nll = {lam: 0.0 for lam in lambdas}

    def result(self, **settings) -> dict:
        n = max(self.n, 1)
        return {
            **settings,
            "positions": self.n,
            "base_accuracy": self.base_correct / n,
            "accuracy": self.correct / n,
            "tpr": self.tp / n,
            "fpr": self.fp / n,
            "gain": (self.tp - self.fp) / n,
            "base_ppl": math.exp(self.base_nll / n),
            "ppl_clamp": math.exp(self.clamp_nll / n),
            "ppl_mixture": {str(lam): math.exp(v / n) for lam, v in self.mix_nll.items()},
        }


def _chunk_metrics(memory, base_logits, labels, dist, ids, grid, lambdas, accs, floor, temperature):
    """Update the accumulators with one chunk of positions: base_logits `(n, V)`, labels `(n,)`, neighbours `(n, kmax)`.

    Perplexities use only the label's entries: `clamp` = `log(max(s_y, floor)) - log(sum_v max(s_v, floor))`
    and `mixture` = `log((1 - lam) * max(s_y, 0) / sum_v max(s_v, 0) + lam * softmax(f)_y)`, the same values
    as the model's `logits` in either mode without materialising them per `lam`.
    """
    base_logp = torch.log_softmax(base_logits, dim=-1)  # (n, V)
    base_logp_y = base_logp.gather(1, labels[:, None]).squeeze(1)  # (n,)
    base_p = torch.softmax(base_logits / temperature, dim=-1)  # (n, V)
    base_ok = base_logits.argmax(-1) == labels
    values, indices = memory.neighbour_values(ids)  # (n, kmax, m)
    for k, sigma in grid:
        weights = neighbour_weights(dist[:, :k], sigma)  # (n, k)
        idx = None if indices is None else indices[:, :k]
        scores = sparse_weighted_residual(weights, values[:, :k], idx, base_logits.shape[-1])  # (n, V) residual
        scores += base_p  # (n, V) scores
        s_y = scores.gather(1, labels[:, None]).squeeze(1)  # (n,)
        ok = scores.argmax(-1) == labels
        acc = accs[k, sigma]
        acc.n += labels.shape[0]
        acc.base_correct += int(base_ok.sum())
        acc.correct += int(ok.sum())
        acc.tp += int((~base_ok & ok).sum())
        acc.fp += int((base_ok & ~ok).sum())
        acc.base_nll -= float(base_logp_y.sum())
        clamp_total = scores.clamp_min(floor).sum(-1)  # (n,)
        acc.clamp_nll -= float((s_y.clamp_min(floor).log() - clamp_total.log()).sum())
        resmem_y = s_y.clamp_min(0) / scores.clamp_min(0).sum(-1).clamp_min(1e-30)  # (n,)
        for lam in lambdas:
            mixed = ((1.0 - lam) * resmem_y + lam * base_logp_y.exp()).clamp_min(1e-30)
            acc.mix_nll[lam] -= float(mixed.log().sum())


@torch.inference_mode()
def evaluate_lm(
    model,
    data,
    tokenizer=None,
    text_column: str = "text",
    ks: list[int] | None = None,
    sigmas: list[float] | None = None,
    lambdas: list[float] | None = None,
    memories: dict | None = None,
    batch_size: int = 8,
    window: int | None = None,
    stride: int | None = None,
    chunk_size: int = 256,
    max_tokens: int | None = None,
) -> list[dict]:
    """Next-token accuracy, perplexities and TPR/FPR/Gain of `model` (a `ResMemForCausalLM`) on `data`.

    Args:
        data, tokenizer, text_column: as in `build_memory` (text or `input_ids`).
        ks, sigmas: grid of neighbour counts and kernel widths (default: the config's `k`, `sigma`).
        lambdas: mixture weights of the base distribution to report (default `DEFAULT_LAMBDAS` plus
            `config.mixture_lambda`).
        memories: `{temperature: TokenResidualMemory}` to evaluate several build temperatures from the
            same base forward (see `ResMemForCausalLM.build_memories`); default `{T: model.memory}`.
        max_tokens: stop after this many evaluated positions (rounded up to a whole batch).
    Returns:
        One dict per `(temperature, k, sigma)` with `positions`, `base_accuracy`, `accuracy`, `tpr`, `fpr`,
        `gain`, `base_ppl`, `ppl_clamp`, `ppl_mixture` (`{lam: ppl}`), `seconds`.
    """
    config = model.config
    if memories is None:
        model._check_ready()
        memories = {float(config.residual_temperature): model.memory}
    ks = sorted(set(ks or [config.k]))
    sigmas = list(sigmas or [config.sigma])
    lambdas = sorted(set(lambdas or DEFAULT_LAMBDAS) | {float(config.mixture_lambda)})
    grid = list(itertools.product(ks, sigmas))
    accs = {t: {g: _Accumulator(lambdas) for g in grid} for t in memories}
    kmax = max(ks)
    started = time.time()
    seen = 0
    was_training = model.training
    model.eval()
    try:
        batches = model.memory_batches(data, tokenizer, text_column, None, batch_size, window, stride)
        for batch, queries, base_logits in model._progress(batches, None, "Evaluating ResMem"):
            labels = batch.labels[batch.store_mask].to(base_logits.device)  # (n,)
            any_memory = next(iter(memories.values()))
            dist, ids = any_memory.search(queries, kmax, config.index, config.index_params)  # (n, kmax): keys are shared
            for s in range(0, labels.shape[0], chunk_size):
                part = slice(s, s + chunk_size)
                for t, memory in memories.items():
                    _chunk_metrics(
                        memory, base_logits[part], labels[part], dist[part], ids[part], grid, lambdas, accs[t],
                        config.score_floor, t,
                    )
            seen += labels.shape[0]
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        model.train(was_training)
    seconds = time.time() - started
    return [
        acc.result(temperature=t, k=k, sigma=sigma, seconds=seconds)
        for t, by_setting in accs.items()
        for (k, sigma), acc in by_setting.items()
    ]


def best_setting(results: list[dict], fpr_max: float | None = None) -> dict:
    """The result with the highest accuracy (or, with `fpr_max`, the highest TPR subject to FPR < fpr_max)."""
    if fpr_max is None:
        return max(results, key=lambda r: (r["accuracy"], -r["ppl_clamp"]))
    allowed = [r for r in results if r["fpr"] < fpr_max] or results
    return max(allowed, key=lambda r: r["tpr"])


def best_lambda(result: dict) -> float:
    """The mixture weight with the lowest perplexity in one result."""
    return float(min(result["ppl_mixture"].items(), key=lambda item: item[1])[0])


def format_results(results: list[dict]) -> str:
    """A markdown table of evaluation results."""
    lines = [
        "| T | k | sigma | base acc | ResMem acc | TPR | FPR | Gain | base ppl | ppl clamp | best mixture ppl (lam) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lam = best_lambda(r)
        lines.append(
            f"| {r['temperature']:g} | {r['k']} | {r['sigma']:g} | {100 * r['base_accuracy']:.2f} | "
            f"{100 * r['accuracy']:.2f} | {100 * r['tpr']:.2f} | {100 * r['fpr']:.2f} | {100 * r['gain']:+.2f} | "
            f"{r['base_ppl']:.2f} | {r['ppl_clamp']:.2f} | {r['ppl_mixture'][str(lam)]:.2f} ({lam:g}) |"
        )
    return "\n".join(lines)


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `resmem eval` and `resmem tune` share for a saved causal LM and its text."""
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    parser.add_argument("--data", required=True, nargs="+", help="text file(s) (.txt, .txt.gz) read with load_dataset('text')")
    parser.add_argument("--sample-by", default="paragraph", choices=["line", "paragraph", "document"])
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, help="stop after this many evaluated positions")


def load_model_and_text(path: str, args: argparse.Namespace):
    """`(model, tokenizer, dataset)`: the saved ResMem causal LM at `path` and the text of `args.data`."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import resmem  # noqa: F401  registers the Auto classes

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or path)
    model = AutoModelForCausalLM.from_pretrained(path, tokenizer=tokenizer)
    data = load_dataset("text", data_files=args.data, sample_by=args.sample_by, split="train")
    return model, tokenizer, data


def main_eval_lm(argv: list[str] | None = None) -> list[dict]:
    """`resmem eval` for causal LMs: evaluate a saved ResMem model on a text file / dataset."""
    parser = argparse.ArgumentParser(prog="resmem eval (causal-lm)", description=main_eval_lm.__doc__)
    parser.add_argument("--model", required=True, help="folder or Hub id of a saved ResMemForCausalLM")
    add_text_arguments(parser)
    parser.add_argument("--k", type=int, nargs="*", help="neighbour counts to evaluate (default: config.k)")
    parser.add_argument("--sigma", type=float, nargs="*", help="kernel widths to evaluate (default: config.sigma)")
    parser.add_argument("--lam", type=float, nargs="*", help="mixture weights of the base model to report")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)

    model, tokenizer, data = load_model_and_text(args.model, args)
    results = evaluate_lm(
        model, data, tokenizer, args.text_column, ks=args.k, sigmas=args.sigma, lambdas=args.lam,
        batch_size=args.batch_size, max_tokens=args.max_tokens,
    )
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main_eval_lm()
