"""Causal-LM memory builds over 2 CPU ranks (gloo, torchrun) equal the one-process build entry for entry;
mismatched data and a failure on one rank stop every rank with the same clear error; the build's progress
bar counts examples with a total.

One torchrun launch runs every case (`dist_script.py cases`, shared with test_distributed.py and
test_distributed_faults.py); each rank saves its memory per case.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from dist_script import case_status as status
from dist_script import (
    lm_evaluation, lm_memory_tensors, lm_queries, lm_tensor_and_mask, lm_texts, lm_token_lists, shared_cases_run,
)
from lm_helpers import tiny_base, word_tokenizer
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from resmem import ResMemWrapper

COMMON = dict(window=16, stride=12, batch_size=3)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return shared_cases_run(tmp_path_factory)  # one torchrun launch for every test_distributed*.py file


def new_model():
    return ResMemWrapper.from_base(tiny_base("gpt2", seed=0), k=4, sigma=0.5, temperature=1.0)


def one_process(case: str) -> dict:
    """The same build as `dist_script.lm`'s case, in this (single) process."""
    model = new_model()
    if case == "lm_texts_dense_two_temps":
        data = datasets.Dataset.from_dict({"text": lm_texts()})
        memories = model.build_memories(data, [1.0, 2.0], tokenizer=word_tokenizer(100), residual_top_m=None, **COMMON)
        return {f"{name}_T{t}": v for t, m in memories.items() for name, v in lm_memory_tensors(m).items()}
    if case == "lm_tensor_mask":
        ids, mask = lm_tensor_and_mask()
        model.build_memory(ids, attention_mask=mask, residual_top_m=8, **COMMON)
    else:
        tokens = lm_token_lists()[:1] if case == "lm_one_example" else lm_token_lists()
        model.build_memory(tokens, residual_top_m=16, **COMMON)
    out = lm_memory_tensors(model.memory)
    with torch.no_grad():
        out["scores"] = model(input_ids=torch.tensor(lm_queries())).scores
    out["stats"] = torch.tensor([model.memory_stats[k] for k in ("skipped", "windows", "tokens_forward", "entries")])
    return out


@pytest.mark.parametrize("case", ["lm_tokens", "lm_texts_dense_two_temps", "lm_tensor_mask", "lm_one_example"])
def test_two_ranks_build_the_one_process_lm_memory_entry_for_entry(lm_run, case):
    """Token lists (7 examples: unequal shards, several windows, one text too short), a text Dataset with two
    temperatures and dense residuals, a padded tensor with its mask, and 1 example (rank 1's shard is empty).
    keys, values, indices, labels, example_ids, positions, the summed stats and the forward scores are equal."""
    assert status(lm_run, case) == ["OK", "OK"]
    want = one_process(case)
    assert len(want["keys" if "keys" in want else "keys_T1.0"]) > 0
    for rank in (0, 1):
        got = load_file(str(lm_run / f"{case}.rank{rank}.safetensors"))
        assert set(got) == set(want), (case, rank)
        for name, expected in want.items():
            assert torch.equal(got[name], expected), (case, rank, name)


def test_the_main_process_alone_saves_a_memory_that_loads_to_the_same_scores(lm_run):
    assert status(lm_run, "lm_save") == ["OK", "OK"]
    loaded = ResMemWrapper.from_pretrained(lm_run / "lm_saved")
    with torch.no_grad():
        scores = loaded(input_ids=torch.tensor(lm_queries())).scores
    assert torch.equal(scores, one_process("lm_tokens")["scores"])


@pytest.mark.parametrize("case,detail", [("lm_shuffle", "8 rows"), ("lm_lengths", "process 1: 6 rows")])
def test_mismatched_lm_data_is_refused_on_every_rank(lm_run, case, detail):
    ranks = status(lm_run, case)
    assert ranks[0] == ranks[1]
    assert ranks[0].startswith("ERROR ValueError: The processes do not see the same dataset") and detail in ranks[0]
    assert "causal-LM memory build" in ranks[0]


def test_a_different_residual_top_m_per_rank_is_refused(lm_run):
    ranks = status(lm_run, "lm_top_m")
    assert ranks[0] == ranks[1]
    assert ranks[0].startswith("ERROR ValueError: The processes pass different arguments to the causal-LM memory build")
    assert "'top_m': 8" in ranks[0] and "'top_m': 9" in ranks[0]


def test_a_bad_token_in_one_ranks_shard_stops_every_rank(lm_run):
    ranks = status(lm_run, "lm_bad_token")
    expected = "has token ids outside [0, 128) (max 999)"
    assert ranks[1].startswith("ERROR ValueError: Example 6 " + expected)  # its id in the whole dataset
    assert ranks[0].startswith("ERROR ValueError: Process 1 of 2 failed") and expected in ranks[0]


def test_two_rank_lm_evaluation_equals_one_process(lm_run):
    """`evaluate_lm(accelerator=)`: shards of examples, sums added over ranks; counts equal exactly, perplexities
    up to the rounding of summing log-likelihoods in another order."""
    assert status(lm_run, "lm_eval") == ["OK", "OK"]
    want = lm_evaluation()["results"]  # (settings, fields)
    for rank in (0, 1):
        got = load_file(str(lm_run / f"lm_eval.rank{rank}.safetensors"))["results"]
        assert torch.equal(got[:, :6], want[:, :6])  # positions, accuracies, TPR, FPR, gain
        torch.testing.assert_close(got[:, 6:], want[:, 6:], rtol=1e-12, atol=0)


def test_lm_build_progress_bar_counts_examples_with_a_total(capsys):
    """A bar over examples (7/7, with an ETA while it runs), not an open-ended count of batches."""
    hf_logging.enable_progress_bar()
    try:
        new_model().build_memory(lm_token_lists(), residual_top_m=16, **COMMON)
    finally:
        hf_logging.disable_progress_bar()
    err = capsys.readouterr().err
    assert "Building ResMem memory" in err and "7/7" in err and "example" in err
