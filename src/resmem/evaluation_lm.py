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
- `knn_lm[tau][lam]["ppl"]` (with `knn_temperatures=`): the kNN-LM of the same neighbours' next tokens,
  `lam * p_kNN + (1 - lam) * softmax(f(x))` (`config.distribution = "knn-lm"`, `resmem.knn_lm`), with its own
  accuracy / TPR / FPR (its argmax is its prediction).
- `adaptive[lam_max][tau]` (with `adaptive=[(lam_max, tau), ...]`): the distance-gated mixture
  `w * renormalise(clamp(scores, 0)) + (1 - w) * softmax(f(x))`, `w = lam_max * exp(-d_1 / tau)`
  (`config.distribution = "adaptive"`, `resmem.adaptive_mixture`), with its own accuracy / TPR / FPR, and the
  rates of `adaptive_prediction="resmem"` (ResMem's argmax where the gate is open) as `gated_accuracy`,
  `gated_tpr`, `gated_fpr`, `gated_gain`. Logistic-gate entries `(lam_max, tau, "logistic", d0)` are under
  `adaptive_logistic[lam_max][d0][tau]` (`adaptive_entries(row)` lists both tables).

Command line: `resmem eval MODEL --data test.txt.gz --max-tokens 20000` (at the saved setting; see
`resmem.commands`).
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from .distributed import DistributedBuild, process_info
from .adaptive_mixture import adaptive_weight, gate_open
from .residuals import neighbour_weights, sparse_weighted_residual
from .scoring import correctness_counts, perplexity, rates_from_counts

DEFAULT_LAMBDAS = (0.1, 0.25, 0.5, 0.75, 0.9)
# The columns of a printed grid: no best-of-lambda column (choosing a lambda is tune's job, on validation text).
TABLE_COLUMNS = ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain", "base_ppl", "ppl_clamp")


class _Accumulator:
    """Running sums for one `(k, sigma)` setting (and the kNN-LM's at that `k`, per `(knn_temperature, lam)`)."""

    def __init__(self, lambdas, knn_temperatures=(), adaptive=()):
        self.n = 0
        self.base_correct = self.correct = self.tp = self.fp = 0
        self.base_nll = self.clamp_nll = 0.0
        self.mix_nll = {lam: 0.0 for lam in lambdas}
        knn = [(float(tau), float(lam)) for tau in knn_temperatures for lam in lambdas]
        self.knn_correct = dict.fromkeys(knn, 0)
        self.knn_tp = dict.fromkeys(knn, 0)
        self.knn_fp = dict.fromkeys(knn, 0)
        self.knn_nll = dict.fromkeys(knn, 0.0)
        adaptive = [adaptive_key(entry) for entry in adaptive]
        self.ada_g_correct = dict.fromkeys(adaptive, 0)  # adaptive_prediction="resmem": ResMem's argmax where open
        self.ada_g_tp = dict.fromkeys(adaptive, 0)
        self.ada_g_fp = dict.fromkeys(adaptive, 0)
        self.ada_correct = dict.fromkeys(adaptive, 0)
        self.ada_tp = dict.fromkeys(adaptive, 0)
        self.ada_fp = dict.fromkeys(adaptive, 0)
        self.ada_nll = dict.fromkeys(adaptive, 0.0)

    def add_adaptive(self, key, base_ok, ok, logp_y, gated_ok) -> None:
        """Add one chunk of the adaptive mixture at `key = (lam_max, tau, gate, d0)`: correctness of its argmax and of
        the gated ResMem argmax, and the label log-probability, each `(n,)`."""
        _, _, correct, fixed, broken = correctness_counts(base_ok, ok)
        self.ada_correct[key] += correct
        self.ada_tp[key] += fixed
        self.ada_fp[key] += broken
        self.ada_nll[key] -= float(logp_y.sum())
        _, _, correct, fixed, broken = correctness_counts(base_ok, gated_ok)
        self.ada_g_correct[key] += correct
        self.ada_g_tp[key] += fixed
        self.ada_g_fp[key] += broken

    def add_knn(self, key, base_ok, ok, logp_y) -> None:
        """Add one chunk of the kNN-LM at `key = (knn_temperature, lam)`: correctness and label log-probability `(n,)`."""
        _, _, correct, fixed, broken = correctness_counts(base_ok, ok)
        self.knn_correct[key] += correct
        self.knn_tp[key] += fixed
        self.knn_fp[key] += broken
        self.knn_nll[key] -= float(logp_y.sum())

    def add(self, base_ok, ok, base_logp_y, clamp_logp_y, resmem_p_y) -> None:
        """Add one chunk of `n` positions (every argument `(n,)`).

        Args:
            base_ok, ok: whether the base model / ResMem predicts the next token right (bool).
            base_logp_y: the base model's log-probability of the next token.
            clamp_logp_y: its log-probability under the clamped scores (`distribution="clamp"`).
            resmem_p_y: its probability under `renormalise(clamp(scores, 0))`, mixed with the base for each lambda.
        """
        n, base_correct, correct, fixed, broken = correctness_counts(base_ok, ok)
        self.n += n
        self.base_correct += base_correct
        self.correct += correct
        self.tp += fixed
        self.fp += broken
        self.base_nll -= float(base_logp_y.sum())
        self.clamp_nll -= float(clamp_logp_y.sum())
        base_p_y = base_logp_y.exp()  # (n,)
        for lam in self.mix_nll:
            mixed = ((1.0 - lam) * resmem_p_y + lam * base_p_y).clamp_min(1e-30)
            self.mix_nll[lam] -= float(mixed.log().sum())

    def result(self, **settings) -> dict:
        """One result row: the rates (from `resmem.scoring.rates_from_counts`) and the perplexities."""
        if self.n == 0:
            raise ValueError("The evaluation data has no token position with a next token: pass texts of 2+ tokens.")
        rates = rates_from_counts(self.n, self.base_correct, self.correct, self.tp, self.fp)
        return {
            **settings,
            "positions": self.n,
            "base_accuracy": rates["base_accuracy"],
            "accuracy": rates["resmem_accuracy"],
            "tpr": rates["tpr"],
            "fpr": rates["fpr"],
            "gain": rates["gain"],
            "base_ppl": perplexity(self.base_nll, self.n),
            "ppl_clamp": perplexity(self.clamp_nll, self.n),
            "ppl_mixture": {str(lam): perplexity(v, self.n) for lam, v in self.mix_nll.items()},
            **self._knn_result(),
            **self._adaptive_result(),
        }

    def _adaptive_result(self) -> dict:
        """`{"adaptive": {str(lam_max): {str(tau): entry}}}` (exp gate) and `{"adaptive_logistic": {str(lam_max):
        {str(d0): {str(tau): entry}}}}`, entry = `{"accuracy", "tpr", "fpr", "gain", "ppl", "gated_accuracy",
        "gated_tpr", "gated_fpr", "gated_gain"}`; empty without a grid."""
        if not self.ada_nll:
            return {}
        tables: dict = {}
        for key, nll in self.ada_nll.items():
            lm, tau, gate, d0 = key
            rates = rates_from_counts(self.n, self.base_correct, self.ada_correct[key], self.ada_tp[key], self.ada_fp[key])
            gated = rates_from_counts(
                self.n, self.base_correct, self.ada_g_correct[key], self.ada_g_tp[key], self.ada_g_fp[key]
            )
            entry = {
                "accuracy": rates["resmem_accuracy"], "tpr": rates["tpr"], "fpr": rates["fpr"], "gain": rates["gain"],
                "ppl": perplexity(nll, self.n), "gated_accuracy": gated["resmem_accuracy"], "gated_tpr": gated["tpr"],
                "gated_fpr": gated["fpr"], "gated_gain": gated["gain"],
            }
            if gate == "exp":
                tables.setdefault("adaptive", {}).setdefault(str(lm), {})[str(tau)] = entry
            else:
                tables.setdefault("adaptive_logistic", {}).setdefault(str(lm), {}).setdefault(str(d0), {})[str(tau)] = entry
        return tables

    def _knn_result(self) -> dict:
        """`{"knn_lm": {str(tau): {str(lam): {"accuracy", "tpr", "fpr", "gain", "ppl"}}}}`, empty without a kNN-LM grid."""
        if not self.knn_nll:
            return {}
        table: dict = {}
        for (tau, lam), nll in self.knn_nll.items():
            rates = rates_from_counts(
                self.n, self.base_correct, self.knn_correct[tau, lam], self.knn_tp[tau, lam], self.knn_fp[tau, lam]
            )
            table.setdefault(str(tau), {})[str(lam)] = {
                "accuracy": rates["resmem_accuracy"], "tpr": rates["tpr"], "fpr": rates["fpr"], "gain": rates["gain"],
                "ppl": perplexity(nll, self.n),
            }
        return {"knn_lm": table}


def _chunk_metrics(memory, base_logits, labels, dist, ids, grid, lambdas, accs, floor, temperature, adaptive=()):
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
        clamp_total = scores.clamp_min(floor).sum(-1)  # (n,)
        resmem_y = s_y.clamp_min(0) / scores.clamp_min(0).sum(-1).clamp_min(1e-30)  # (n,)
        accs[k, sigma].add(base_ok, ok, base_logp_y, s_y.clamp_min(floor).log() - clamp_total.log(), resmem_y)
        if adaptive:  # the adaptive mixture over the whole vocabulary, as the forward computes it
            q = scores.clamp_min(0)  # (n, V)
            q /= q.sum(-1, keepdim=True).clamp_min(1e-30)
            p1 = torch.softmax(base_logits.float(), dim=-1)  # (n, V) base at T = 1
            for key in adaptive:
                lm, tau, gate, d0 = key
                w = adaptive_weight(dist[:, 0], lm, tau, gate, d0).to(q.device).unsqueeze(1)  # (n, 1)
                mix = w * q + (1.0 - w) * p1  # (n, V)
                logp_y = mix.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-30).log()  # (n,)
                mix_ok = mix.argmax(-1) == labels
                gated_ok = torch.where(gate_open(dist[:, 0], tau, gate, d0).to(ok.device), ok, mix_ok)  # (n,)
                accs[k, sigma].add_adaptive(key, base_ok, mix_ok, logp_y, gated_ok)


def _knn_chunk_metrics(memory, base_logits, labels, dist, ids, ks, knn_temperatures, lambdas, accs) -> None:
    """Add the kNN-LM's counts and label log-probabilities for every `(k, knn_temperature, lam)` (`resmem.knn_lm`)."""
    from .knn_lm import knn_lm_chunk

    neighbour_labels = memory.field_rows("labels", ids.reshape(-1)).view(ids.shape).to(base_logits.device)  # (n, kmax)
    base_ok = base_logits.argmax(-1) == labels  # (n,)
    results = knn_lm_chunk(base_logits, labels, dist.to(base_logits.device), neighbour_labels, ks, knn_temperatures, lambdas)
    for (k, tau, lam), (ok, logp_y) in results.items():
        for by_setting in accs.values():  # every memory temperature and sigma at this k: the kNN-LM ignores both
            for (k2, _), acc in by_setting.items():
                if k2 == k:
                    acc.add_knn((tau, lam), base_ok, ok, logp_y)


def _touched_table(indices: torch.Tensor, num_columns: int) -> dict:
    """Per-position compact table of the distinct vocabulary columns touched by the neighbours' residuals.

    Setting-independent (built once per chunk from the `kmax` neighbours). `indices` `(n, kmax, m)`,
    flattened neighbour-major to `(n, L)`, `L = kmax*m` (so the first `k*m` belong to the first `k`
    neighbours). Returns `slot` `(n, L)`: the table column of each stored value; `tokens` `(n, U)`: the
    vocabulary id of each table column (columns in order of first occurrence, `U` = the most distinct
    ids of any position); `used` `(n, U)` bool: columns that hold an id; `flat` `(n, L)`.
    Distinct ids are found with one `amin` scatter of positions into an `(n, V)` int32 scratch
    (first occurrence of each id), 4x faster than sorting the ids.
    """
    n = indices.shape[0]
    flat = indices.reshape(n, -1).long()  # (n, L)
    width = flat.shape[1]
    positions = torch.arange(width, dtype=torch.int32, device=flat.device).expand(n, width)  # (n, L)
    first = torch.full((n, num_columns), width, dtype=torch.int32, device=flat.device)  # (n, V) scratch
    first.scatter_reduce_(1, flat, positions, reduce="amin")
    is_first = first.gather(1, flat) == positions  # (n, L) first occurrence of its id
    column = is_first.long().cumsum(1) - 1  # (n, L) compact column of each first occurrence
    counts = is_first.sum(1)  # (n,) distinct ids per position
    u = max(int(counts.max()), 1) if n else 1
    slot = column.gather(1, first.gather(1, flat).long())  # (n, L) column of each stored value's id
    target = torch.where(is_first, column, u)  # (n, L) non-first occurrences go to a dropped column u
    tokens = torch.zeros(n, u + 1, dtype=torch.long, device=flat.device).scatter_(1, target, flat)[:, :u]  # (n, U)
    used = torch.arange(u, device=flat.device) < counts.unsqueeze(1)  # (n, U)
    return {"slot": slot, "tokens": tokens, "used": used, "flat": flat}


def _chunk_metrics_sparse(memory, base_logits, labels, dist, ids, grid, lambdas, accs, floor, temperature, adaptive=()):
    """As `_chunk_metrics`, with per-setting cost O(n * k * m) instead of O(n * V) (sparse stored residuals).

    Only the touched columns change: with `p = softmax(f(x) / T)`, untouched scores are `p_v` exactly, so
    - argmax: the best touched score against the best untouched `p_v` (found once per chunk), ties to the
      smaller token id as `argmax` does;
    - `sum_v clamp(s_v, c) = sum_v clamp(p_v, c) - sum_touched clamp(p_v, c) + sum_touched clamp(s_v, c)`,
      the first two sums once per chunk (c = floor for the clamp perplexity, 0 for the mixture's normaliser);
    - the label's score from the table when the label is touched, else `p_y`.
    The residual of a touched token is summed in the stored order starting from 0, as the dense
    scatter-add does, so touched scores, and hence accuracy, TPR and FPR, equal the dense computation's
    exactly; the perplexities agree to float32 rounding of the normaliser.
    """
    n = labels.shape[0]
    base_logp = torch.log_softmax(base_logits, dim=-1)  # (n, V)
    base_logp_y = base_logp.gather(1, labels[:, None]).squeeze(1)  # (n,)
    base_p = torch.softmax(base_logits / temperature, dim=-1)  # (n, V)
    base_ok = base_logits.argmax(-1) == labels
    values, indices = memory.neighbour_values(ids)  # (n, kmax, m)
    m = values.shape[-1]
    table = _touched_table(indices, base_p.shape[1])
    slot, tokens, used = table["slot"], table["tokens"], table["used"]  # (n, L), (n, U), (n, U)
    unused = (~used).sum(1)  # (n,)
    # p at the touched columns; -inf in unused columns: their scores stay -inf (never the max), clamp to
    # `floor` (subtracted below) and to 0.
    p_t = base_p.gather(1, tokens).masked_fill_(~used, float("-inf"))  # (n, U)
    p_y = base_p.gather(1, labels[:, None]).squeeze(1)  # (n,)
    label_hit = used & (tokens == labels[:, None])  # (n, U)
    has_label = label_hit.any(1)  # (n,)
    label_slot = label_hit.long().argmax(1, keepdim=True)  # (n, 1)
    rest = base_p.scatter(1, table["flat"], float("-inf"))  # (n, V) untouched p only (one copy per chunk)
    best_rest, best_rest_tok = rest.max(dim=1)  # (n,)
    clamp_all = base_p.clamp_min(floor).sum(-1) - p_t.clamp_min(floor).sum(1)  # (n,) untouched part
    clamp_all -= unused * floor  # the unused columns' clamp(-inf + r, floor) = floor, added back per setting
    pos_all = base_p.sum(-1) - p_t.clamp_min(0).sum(1)  # (n,)  (p >= 0: clamp(p, 0) = p)
    values = values.float()
    for k, sigma in grid:
        weights = neighbour_weights(dist[:, :k], sigma)  # (n, k)
        weighted = (weights.unsqueeze(-1) * values[:, :k]).reshape(n, -1)  # (n, k*m)
        s_t = torch.zeros(n, tokens.shape[1], dtype=torch.float32, device=weighted.device)  # (n, U)
        s_t.scatter_add_(1, slot[:, : k * m], weighted).add_(p_t)  # (n, U) residual (from 0), then + p
        best_t = s_t.max(dim=1, keepdim=True).values  # (n, 1)
        best_tok = tokens.masked_fill(s_t != best_t, base_p.shape[1]).min(dim=1).values  # ties: smallest id
        best_t = best_t.squeeze(1)
        touched_wins = (best_t > best_rest) | ((best_t == best_rest) & (best_tok < best_rest_tok))
        ok = torch.where(touched_wins, best_tok, best_rest_tok) == labels
        s_y = torch.where(has_label, s_t.gather(1, label_slot).squeeze(1), p_y)  # (n,)
        clamp_total = clamp_all + s_t.clamp_min(floor).sum(1)  # (n,)
        pos_total = pos_all + s_t.clamp_min_(0).sum(1)  # (n,)
        resmem_y = s_y.clamp_min(0) / pos_total.clamp_min(1e-30)  # (n,)
        accs[k, sigma].add(base_ok, ok, base_logp_y, s_y.clamp_min(floor).log() - clamp_total.log(), resmem_y)
        if adaptive:  # s_t is clamped at 0 now (pos_total above): the touched part of the memory side q
            _adaptive_sparse(accs[k, sigma], adaptive, dist[:, 0], base_logits, labels, base_ok, tokens, used,
                             s_t / pos_total.clamp_min(1e-30).unsqueeze(1), resmem_y, best_rest / pos_total.clamp_min(1e-30),
                             best_rest_tok, ok)


def _adaptive_sparse(acc, adaptive, d1, base_logits, labels, base_ok, tokens, used, q_t, q_y, q_rest, rest_tok,
                     resmem_ok) -> None:
    """The adaptive mixture's argmax and label log-probability from the touched columns only (O(n * U) per setting).

    Untouched tokens have `q_v = p_T(v) / Z` and base `p_1(v)`, both increasing in the logit, so their best mixture
    value is at the untouched token of largest base probability (`rest_tok`, found once per chunk). Shapes: `d1`,
    `labels`, `base_ok`, `q_y`, `q_rest`, `rest_tok`, `resmem_ok` (ResMem's scores' argmax is right) `(n,)`;
    `tokens`, `used`, `q_t` `(n, U)`.

    Why the touched columns are first cut to their Pareto front in `(p_1, q)`: the mixture `w q + (1 - w) p_1` has
    non-negative coefficients, so a column with another column at least as large in both coordinates (and larger in
    one) can never be the strict argmax, at any setting. The front (a few columns per row, where `U` is thousands)
    is found once per call (one sort by `p_1`, a running max of `q`), so the per-setting work is O(n * front). Only a
    float tie between a dropped column and its dominator (rounding collapsing a strict inequality) could pick
    another id than the dense argmax; none occurs in the tests' data.
    """
    v = base_logits.shape[1]
    p1 = torch.softmax(base_logits.float(), dim=-1)  # (n, V) base at T = 1
    p1_t = p1.gather(1, tokens).masked_fill_(~used, -1.0)  # (n, U); unused columns sort last
    order = p1_t.argsort(dim=1, descending=True, stable=True)  # (n, U) by p_1, descending
    q_sorted = q_t.gather(1, order).masked_fill_(~used.gather(1, order), float("-inf"))  # (n, U)
    prior = torch.cummax(q_sorted, dim=1).values.roll(1, dims=1)  # (n, U) best q among columns of larger p_1
    prior[:, 0] = float("-inf")
    front = used.gather(1, order) & (q_sorted >= prior)  # (n, U) not dominated by an earlier (larger-p_1) column
    width = max(int(front.sum(1).max()), 1) if front.numel() else 1
    pick_sorted = front.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]  # (n, W) front first
    used, pick = front.gather(1, pick_sorted), order.gather(1, pick_sorted)  # (n, W): front flags, their columns
    tokens, q_t, p1_t = tokens.gather(1, pick), q_t.gather(1, pick), p1_t.gather(1, pick)  # (n, W) each
    p1_y = p1.gather(1, labels[:, None]).squeeze(1)  # (n,)
    p1_rest = p1.gather(1, rest_tok[:, None]).squeeze(1)  # (n,)
    for key in adaptive:
        lm, tau, gate, d0 = key
        w = adaptive_weight(d1, lm, tau, gate, d0).to(p1.device)  # (n,)
        mix_t = (w[:, None] * q_t + (1.0 - w[:, None]) * p1_t).masked_fill_(~used, float("-inf"))  # (n, U)
        best_t = mix_t.max(dim=1, keepdim=True).values  # (n, 1)
        best_tok = tokens.masked_fill(mix_t != best_t, v).min(dim=1).values  # (n,) ties: smallest id
        best_t = best_t.squeeze(1)
        best_rest = w * q_rest + (1.0 - w) * p1_rest  # (n,)
        wins = (best_t > best_rest) | ((best_t == best_rest) & (best_tok < rest_tok))
        ok = torch.where(wins, best_tok, rest_tok) == labels
        logp_y = (w * q_y + (1.0 - w) * p1_y).clamp_min(1e-30).log()  # (n,)
        gated_ok = torch.where(gate_open(d1, tau, gate, d0).to(ok.device), resmem_ok, ok)  # (n,)
        acc.add_adaptive(key, base_ok, ok, logp_y, gated_ok)

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
    sparse: bool = True,
    accelerator=None,
    progress: bool = True,
    knn_temperatures: list[float] | None = None,
    adaptive: list[tuple] | None = None,
) -> list[dict]:
    """Next-token accuracy, perplexities and TPR/FPR/Gain of `model` (a `ResMemForCausalLM`) on `data`.

    Args:
        data, tokenizer, text_column: as in `build_memory` (text or `input_ids`).
        ks, sigmas: grid of neighbour counts and kernel widths (default: the config's `k`, `sigma`).
        lambdas: mixture weights of the base distribution to report (default `DEFAULT_LAMBDAS` plus
            `config.mixture_lambda`).
        memories: `{temperature: TokenResidualMemory}` to evaluate several build temperatures from the
            same base forward (see `ResMemForCausalLM.build_memories`); default `{T: model.memory}`.
        max_tokens: stop after this many evaluated positions (rounded up to a whole batch); under several
            processes, each stops after its share (`max_tokens / num_processes`) of its own shard.
        sparse: score each setting from the touched vocabulary columns only (`_chunk_metrics_sparse`,
            per-setting cost O(positions * k * m) instead of O(positions * V)); `False` uses the dense
            computation (same accuracy/TPR/FPR exactly, perplexities within float32 rounding). Memories
            with dense residuals always use the dense one.
        accelerator: an `accelerate.Accelerator` (or `PartialState`; detected from `torch.distributed` when
            omitted) to split the examples over its processes (contiguous shards, same data on every process,
            checked first); the sums are added up over processes, so every process returns the same results,
            equal to a one-process evaluation (up to float rounding of the summed log-likelihoods).
        progress: show a progress bar over examples (with a total when `data` has a length; main process only).
        knn_temperatures: also score the kNN-LM of the same neighbours (`resmem.knn_lm`) at every `k`, each of
            these temperatures and each of `lambdas` (then the weight of `p_kNN`). Default: `[config.knn_temperature]`
            when `config.distribution == "knn-lm"`, else none (`[]`).
        adaptive: also score the adaptive mixture (`resmem.adaptive_mixture`) at every `(k, sigma)` for each
            `(adaptive_lambda_max, adaptive_tau)` pair (exp gate) or `(adaptive_lambda_max, adaptive_tau, gate, d0)`
            of this list, from the same search. Default: the config's setting when `config.distribution ==
            "adaptive"`, else `[]`.
    Returns:
        One dict per `(temperature, k, sigma)` with `positions`, `base_accuracy`, `accuracy`, `tpr`, `fpr`,
        `gain`, `base_ppl`, `ppl_clamp`, `ppl_mixture` (`{lam: ppl}`), `seconds`; with a kNN-LM grid also
        `knn_lm` (`{str(knn_temperature): {str(lam): {"accuracy", "tpr", "fpr", "gain", "ppl"}}}`, the kNN-LM at
        that row's `k`: its argmax and perplexity, independent of `sigma` and of the memory's temperature); with an
        adaptive grid also `adaptive` (`{str(lam_max): {str(tau): {"accuracy", "tpr", "fpr", "gain", "ppl", "gated_*"}}}`)
        and, for logistic entries, `adaptive_logistic` (`{str(lam_max): {str(d0): {str(tau): ...}}}`).
    """
    config = model.config
    if memories is None:
        model._check_ready()
        memories = {float(config.residual_temperature): model.memory}
    ks = sorted(set(ks or [config.k]))
    sigmas = list(sigmas or [config.sigma])
    lambdas = sorted(set(lambdas or DEFAULT_LAMBDAS) | {float(config.mixture_lambda)})
    if knn_temperatures is None:
        knn_temperatures = [float(config.knn_temperature)] if config.distribution == "knn-lm" else []
    knn_temperatures = sorted({float(tau) for tau in knn_temperatures})
    if adaptive is None:
        adaptive = [config_adaptive_key(config)] if config.distribution == "adaptive" else []
    adaptive = sorted({adaptive_key(entry) for entry in adaptive})
    grid = list(itertools.product(ks, sigmas))
    accs = {t: {g: _Accumulator(lambdas, knn_temperatures, adaptive) for g in grid} for t in memories}
    kmax = max(ks)
    started = time.time()
    seen = 0
    was_training = model.training
    model.eval()
    info = process_info(accelerator)
    if max_tokens is not None and info.distributed:
        max_tokens = math.ceil(max_tokens / info.num_processes)
    # Same data on every process (checked first); every step exchanges ok/error flags, so none is left waiting.
    settings = {"ks": ks, "sigmas": sigmas, "lambdas": lambdas, "temperatures": sorted(memories),
                "knn_temperatures": knn_temperatures, "adaptive": adaptive, "window": window,
                "stride": stride, "max_tokens": max_tokens}  # the summed accumulators must match across processes
    with DistributedBuild(info, data, what="causal-LM evaluation", settings=settings) as build:
        data, first_row, _ = build.shard(data)
        try:
            stats: dict = {}
            batches = model.memory_batches(
                data, tokenizer, text_column, None, batch_size, window, stride, stats=stats, first_example=first_row
            )
            for batch, queries, base_logits in model._example_progress(
                batches, data, stats, "Evaluating ResMem", info, progress
            ):
                labels = batch.labels[batch.store_mask].to(base_logits.device)  # (n,)
                any_memory = next(iter(memories.values()))
                dist, ids = any_memory.search(queries, kmax, config.index, config.index_params)  # (n, kmax): keys shared
                for s in range(0, labels.shape[0], chunk_size):
                    part = slice(s, s + chunk_size)
                    for t, memory in memories.items():
                        metrics = _chunk_metrics if memory.dense or not sparse else _chunk_metrics_sparse
                        metrics(
                            memory, base_logits[part], labels[part], dist[part], ids[part], grid, lambdas, accs[t],
                            config.score_floor, t, adaptive,
                        )
                    if knn_temperatures:  # the kNN-LM: the same neighbours' next tokens, once per chunk for every T
                        _knn_chunk_metrics(any_memory, base_logits[part], labels[part], dist[part], ids[part], ks,
                                           knn_temperatures, lambdas, accs)
                seen += labels.shape[0]
                if max_tokens is not None and seen >= max_tokens:
                    break
        finally:
            model.train(was_training)
        if info.distributed:
            _sum_over_processes(accs, build)
    seconds = time.time() - started
    return [
        acc.result(temperature=t, k=k, sigma=sigma, seconds=seconds)
        for t, by_setting in accs.items()
        for (k, sigma), acc in by_setting.items()
    ]


def adaptive_key(entry) -> tuple:
    """`(lam_max, tau)` or `(lam_max, tau, gate, d0)` -> `(float lam_max, float tau, gate, float d0)` (d0 = 0 for "exp")."""
    lm, tau, gate, d0 = (*entry, "exp", 0.0) if len(entry) == 2 else entry
    return float(lm), float(tau), str(gate), float(d0) if gate != "exp" else 0.0


def config_adaptive_key(config) -> tuple:
    """The adaptive-grid key of the config's current setting."""
    return adaptive_key((config.adaptive_lambda_max, config.adaptive_tau, config.adaptive_gate, config.adaptive_d0))


def adaptive_entries(row: dict):
    """Yield `((lam_max, tau, gate, d0), entry)` for every adaptive setting of an `evaluate_lm` row (both gates)."""
    for lm, by_tau in row.get("adaptive", {}).items():
        for tau, entry in by_tau.items():
            yield (float(lm), float(tau), "exp", 0.0), entry
    for lm, by_d0 in row.get("adaptive_logistic", {}).items():
        for d0, by_tau in by_d0.items():
            for tau, entry in by_tau.items():
                yield (float(lm), float(tau), "logistic", float(d0)), entry


def adaptive_entry(row: dict, key) -> dict:
    """The entry of one adaptive setting `key` (as `adaptive_key` takes) in an `evaluate_lm` row."""
    lm, tau, gate, d0 = adaptive_key(key)
    if gate == "exp":
        return row["adaptive"][str(lm)][str(tau)]
    return row["adaptive_logistic"][str(lm)][str(d0)][str(tau)]


def _sum_over_processes(accs: dict, build) -> None:
    """Replace every accumulator's sums by their totals over all processes (counts and log-likelihoods add up)."""
    mine = {(t, setting): dict(vars(acc)) for t, by_setting in accs.items() for setting, acc in by_setting.items()}
    every = build.sync(mine, step="evaluation sums")
    for (t, setting), fields in mine.items():
        acc = accs[t][setting]
        for name, value in fields.items():
            if isinstance(value, dict):
                setattr(acc, name, {key: sum(other[(t, setting)][name][key] for other in every) for key in value})
            else:
                setattr(acc, name, sum(other[(t, setting)][name] for other in every))
