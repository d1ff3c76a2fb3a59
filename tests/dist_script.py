"""Run by tests/test_distributed*.py under `torchrun --nproc_per_node 2` (gloo, CPU ranks).

`dist_script.py OUT N`: builds a memory with `Accelerator(cpu=True)` on an odd-sized dataset (unequal
shards), evaluates with `resmem.evaluation.predict`, and lets the main process alone write the results
and a saved model.

`dist_script.py faults OUT` / `dist_script.py lm OUT` / `dist_script.py cases OUT` (`OUT/image` + both): runs several
cases in one launch (start-up costs seconds; `RESMEM_CASES=a,b` runs only those). Each rank writes, per case, `OUT/<case>.rank<r>.txt` ("OK", or "ERROR <type>: <message>" for
the exception it raised) and, for cases that build, its memory's tensors to `OUT/<case>.rank<r>.safetensors`;
the test compares those with a one-process build. A case that hangs stops the whole launch (the test's
timeout kills the process group), so no later case reports.
"""

import os
import sys
import traceback

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_base, make_pixel_dataset, random_pixels  # noqa: E402

from resmem import ResMemWrapper  # noqa: E402
from resmem.evaluation import predict  # noqa: E402


def main(out_dir: str, n: int) -> None:
    torch.set_num_threads(1)
    # RESMEM_DIST_GPU=1 (benchmarks/gpu_check.sh): one GPU per rank under `accelerate launch --multi_gpu`.
    on_gpu = os.environ.get("RESMEM_DIST_GPU") == "1"
    accelerator = Accelerator(cpu=not on_gpu)
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=5, sigma=0.7, temperature=1.3).to(accelerator.device)
    model.build_memory(make_pixel_dataset(n, seed=3), batch_size=8, accelerator=accelerator)
    queries = torch.from_numpy(random_pixels(9, seed=777)).to(accelerator.device)
    with torch.no_grad():
        scores = model(pixel_values=queries).scores
    preds = predict(model, make_pixel_dataset(n, seed=4), batch_size=8, accelerator=accelerator)
    accelerator.wait_for_everyone()
    model.save_pretrained(os.path.join(out_dir, "saved"), is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        m = model.memory
        save_file(
            {k: v.cpu().contiguous() for k, v in {
                "keys": m.keys, "base_logits": m.base_logits, "labels": m.labels, "example_ids": m.example_ids,
                "scores": scores, "pred_base": preds.base, "pred_resmem": preds.resmem, "pred_labels": preds.labels,
                "world": torch.tensor([accelerator.num_processes]),
            }.items()},
            os.path.join(out_dir, "result.safetensors"),
        )
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- cases
def run_case(accelerator, out_dir: str, name: str, fn) -> None:
    """Run one case on this rank; record "OK" (and the tensors `fn` returns) or the exception it raised."""
    rank = accelerator.process_index
    try:
        tensors = fn()
        if tensors is not None:
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                      os.path.join(out_dir, f"{name}.rank{rank}.safetensors"))
        status = "OK"
    except Exception as exc:  # the test checks which error each rank raised
        status = f"ERROR {type(exc).__name__}: {exc}"
        traceback.print_exc()
    with open(os.path.join(out_dir, f"{name}.rank{rank}.txt"), "w") as f:
        f.write(status)
    print(f"[rank {rank}] {name}: {status[:300]}", flush=True)
    accelerator.wait_for_everyone()  # the next case starts together (and a hang here would be a bug of the case)


def image_memory_tensors(memory) -> dict:
    if hasattr(memory, "rows"):  # an OnDiskMemory: read its shards back
        return {name: torch.from_numpy(memory.rows(name)[:]) for name in ("keys", "base_logits", "labels", "example_ids")}
    return {"keys": memory.keys, "base_logits": memory.base_logits, "labels": memory.labels, "example_ids": memory.example_ids}


def faults(out_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=3, sigma=0.7, temperature=1.3)

    def build(dataset, on_disk=None, chunk_rows=4):
        if on_disk is None:
            return image_memory_tensors(model.build_memory(dataset, batch_size=4, accelerator=accelerator))
        folder = os.path.join(out_dir, on_disk)
        memory = model.build_memory_on_disk(dataset, folder, chunk_rows=chunk_rows, accelerator=accelerator, batch_size=4)
        return image_memory_tensors(memory)

    def bad_label(n, row):
        ds = make_pixel_dataset(n, seed=5)
        return ds.map(lambda x, i: {"label": 99 if i == row else x["label"]}, with_indices=True)

    cases = {
        # every rank must see the same data: lengths differ / order differs per rank
        "lengths_ram": lambda: build(make_pixel_dataset(20 + rank, seed=5)),
        "lengths_disk": lambda: build(make_pixel_dataset(20 + rank, seed=5), on_disk="lengths_disk"),
        "shuffle_ram": lambda: build(make_pixel_dataset(40, seed=5).shuffle(seed=rank)),
        "shuffle_disk": lambda: build(make_pixel_dataset(40, seed=5).shuffle(seed=rank), on_disk="shuffle_disk"),
        # empty shards: a 1-row dataset; on disk, a last chunk of 1 row for 2 ranks (chunks of 4, 4, 1)
        "one_row_ram": lambda: build(make_pixel_dataset(1, seed=5)),
        "one_row_disk": lambda: build(make_pixel_dataset(1, seed=5), on_disk="one_row_disk"),
        "small_chunk_disk": lambda: build(make_pixel_dataset(9, seed=5), on_disk="small_chunk_disk"),
        # the folder already holds a memory: only the writing rank (0) raises
        "writer_fails_disk": lambda: build(make_pixel_dataset(9, seed=5), on_disk="small_chunk_disk"),
        # an exception on rank 1 only, mid-build: a bad label in its shard (rows 10..19 of 20; row 19),
        # on disk in the last chunk (rows 16, 17 on rank 0; 18, 19 on rank 1): rank 0 waits in a gather
        "bad_label_ram": lambda: build(bad_label(20, 19)),
        "bad_label_disk": lambda: build(bad_label(20, 19), on_disk="bad_label_disk"),
        # the same arguments too: another chunk count per rank would put the ranks out of step
        "chunk_rows_disk": lambda: build(make_pixel_dataset(9, seed=5), on_disk="chunk_rows_disk", chunk_rows=4 + rank),
        # evaluation too: `predict` on data shuffled per rank
        "predict_shuffle": lambda: predict_shuffled(),
        # flipped copies and another model's residuals (resmem.augmentation), unequal shards of 9 rows
        "hflip_residual_ram": lambda: image_memory_tensors(
            ResMemWrapper.from_base(make_base("resnet", seed=3), k=3).build_memory(
                make_pixel_dataset(9, seed=5), batch_size=4, accelerator=accelerator, augment="hflip",
                residual_model=make_base("resnet", seed=4))),
    }

    def predict_shuffled():
        model.build_memory(make_pixel_dataset(9, seed=5), batch_size=4, accelerator=accelerator)
        predict(model, make_pixel_dataset(12, seed=6).shuffle(seed=rank), batch_size=4, accelerator=accelerator)

    only = os.environ.get("RESMEM_CASES")
    for name, fn in cases.items():
        if only is None or name in only.split(","):
            run_case(accelerator, out_dir, name, fn)


def lm(out_dir: str) -> None:
    import datasets
    from lm_helpers import tiny_base, word_tokenizer

    from resmem.distributed import process_info

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = process_info(accelerator).process_index
    tokenizer = word_tokenizer(100)
    tokens = lm_token_lists()
    texts = lm_texts()

    def build(data, temperatures=None, **kwargs):
        model = ResMemWrapper.from_base(tiny_base("gpt2", seed=0), k=4, sigma=0.5, temperature=1.0)
        common = dict(window=16, stride=12, batch_size=3, accelerator=accelerator)
        if temperatures is not None:
            memories = model.build_memories(data, temperatures, **common, **kwargs)
            return {f"{name}_T{t}": v for t, m in memories.items() for name, v in lm_memory_tensors(m).items()}
        save = kwargs.pop("save", False)
        model.build_memory(data, **common, **kwargs)
        out = lm_memory_tensors(model.memory)
        with torch.no_grad():
            out["scores"] = model(input_ids=torch.tensor(lm_queries())).scores
        out["stats"] = torch.tensor([model.memory_stats[k] for k in ("skipped", "windows", "tokens_forward", "entries")])
        if save:
            model.save_pretrained(os.path.join(out_dir, "lm_saved"), is_main_process=accelerator.is_main_process)
        return out

    cases = {
        "lm_tokens": lambda: build(tokens, residual_top_m=16),
        "lm_texts_dense_two_temps": lambda: build(
            datasets.Dataset.from_dict({"text": texts}), temperatures=[1.0, 2.0], tokenizer=tokenizer, residual_top_m=None
        ),
        "lm_tensor_mask": lambda: build(lm_tensor_and_mask()[0], attention_mask=lm_tensor_and_mask()[1], residual_top_m=8),
        "lm_one_example": lambda: build(tokens[:1], residual_top_m=16),
        "lm_shuffle": lambda: build(datasets.Dataset.from_dict({"text": texts}).shuffle(seed=rank), tokenizer=tokenizer),
        "lm_lengths": lambda: build(tokens[: len(tokens) - rank]),
        "lm_bad_token": lambda: build(tokens[:-1] + [[5, 6, 999, 7]]),  # the last example: rank 1's shard
        "lm_top_m": lambda: build(tokens, residual_top_m=8 + rank),  # rows of another width per rank
        "lm_eval": lambda: lm_evaluation(accelerator),
    }
    only = os.environ.get("RESMEM_CASES")
    for name, fn in cases.items():
        if only is None or name in only.split(","):
            run_case(accelerator, out_dir, name, fn)
    if only is None or "lm_save" in only.split(","):
        run_case(accelerator, out_dir, "lm_save", lambda: build(tokens, residual_top_m=16, save=True))


def lm_evaluation(accelerator=None) -> dict:
    """`evaluate_lm` of a memory built from the token lists on the texts' token ids (2 k x 2 sigma), as tensors."""
    from lm_helpers import tiny_base

    from resmem.evaluation_lm import evaluate_lm

    model = ResMemWrapper.from_base(tiny_base("gpt2", seed=0), k=4, sigma=0.5, temperature=1.0)
    model.build_memory(lm_token_lists(), window=16, stride=12, batch_size=3, residual_top_m=16, accelerator=accelerator)
    queries = lm_token_lists(seed=21)
    results = evaluate_lm(model, queries, ks=[1, 4], sigmas=[0.3, 1.0], window=16, stride=12, batch_size=3,
                          accelerator=accelerator)
    fields = ("positions", "base_accuracy", "accuracy", "tpr", "fpr", "gain", "base_ppl", "ppl_clamp")
    rows = [[r[f] for f in fields] + [r["ppl_mixture"][key] for key in sorted(r["ppl_mixture"])] for r in results]
    return {"results": torch.tensor(rows, dtype=torch.float64)}


# Data shared with the tests (the one-process reference builds from the same values).
def lm_token_lists(seed: int = 11) -> list[list[int]]:
    """7 examples (odd: unequal shards): long ones cut into several windows, one too short to store."""
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 5, 1, 23, 17, 30, 9]
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


def lm_texts() -> list[str]:
    return [" ".join(f"w{t}" for t in ids) for ids in lm_token_lists()] + ["w1 w2 w3"]


def lm_tensor_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(3, 100, (5, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[3, 6:] = 0
    return ids, mask


def lm_queries() -> list[list[int]]:
    g = torch.Generator().manual_seed(13)
    return torch.randint(3, 100, (2, 10), generator=g).tolist()


def lm_memory_tensors(memory) -> dict:
    out = {name: getattr(memory, name) for name in ("keys", "values", "labels", "example_ids", "positions")}
    if not memory.dense:
        out["indices"] = memory.indices
    return out


if __name__ == "__main__":
    if sys.argv[1] == "faults":
        faults(sys.argv[2])
    elif sys.argv[1] == "lm":
        lm(sys.argv[2])
    elif sys.argv[1] == "cases":  # all three, in one launch (what the tests run)
        os.makedirs(os.path.join(sys.argv[2], "image"), exist_ok=True)
        main(os.path.join(sys.argv[2], "image"), 37)
        faults(sys.argv[2])
        lm(sys.argv[2])
    else:
        main(sys.argv[1], int(sys.argv[2]))


def launch(args: list, timeout: float, cases: str | None = None) -> str:
    """Run `dist_script.py <args>` under `torchrun --nproc_per_node 2` (the tests' entry point).

    The launch runs in its own session. torchrun starts each rank in a session of its own, so killing
    torchrun's process group alone would leave hung ranks behind: on a timeout, every descendant of
    torchrun (found before anything is killed) is killed too, and the test fails with the output's tail.
    The output goes to a file, not a pipe, so that nothing left holding a pipe can block the test.
    Returns stdout + stderr.
    """
    import signal
    import subprocess
    import tempfile

    import pytest

    import resmem as imported

    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.dirname(os.path.dirname(os.path.abspath(imported.__file__)))  # the resmem this test process runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, here])}
    env.pop("RESMEM_CASES", None)
    if cases:
        env["RESMEM_CASES"] = cases
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(here, "dist_script.py"), *map(str, args)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            victims = _descendants(proc.pid)
            for pid in victims:
                _kill(pid, signal.SIGKILL)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.seek(0)
        output = log.read()
    if timed_out:
        pytest.fail(f"the 2-rank run {args!r} did not finish in {timeout} s (a hang):\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; children first listed last so parents die before respawning)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [pid, *found]


def _kill(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def case_status(out, case: str) -> list[str]:
    """What each rank recorded for `case`: "OK" or "ERROR <type>: <message>" (fails if a rank never got there)."""
    found = []
    for rank in (0, 1):
        path = os.path.join(out, f"{case}.rank{rank}.txt")
        assert os.path.exists(path), f"rank {rank} never finished case {case!r}"
        with open(path) as f:
            found.append(f.read())
    return found


_SHARED: dict = {}


def shared_cases_run(tmp_path_factory, timeout: float = 300):
    """The folder of ONE `cases` launch per test session: tests/test_distributed.py (in `image/`),
    tests/test_distributed_faults.py and tests/test_distributed_lm.py all read it (each torchrun start-up
    costs as much as the cases)."""
    import pytest

    if "error" in _SHARED:
        pytest.fail(_SHARED["error"])
    if "out" not in _SHARED:
        out = tmp_path_factory.mktemp("dist_cases")
        try:
            launch(["cases", out], timeout)
        except (pytest.fail.Exception, AssertionError) as exc:
            _SHARED["error"] = str(exc)  # fail the other file's tests at once instead of launching again
            raise
        _SHARED["out"] = out
    return _SHARED["out"]
