"""Thread safety of inference: several threads share one ResMem model (as a server's worker threads do).

Every test makes its threads overlap with a `threading.Barrier`, joins them with a timeout (so no
test can hang) and collects each thread's exceptions and results; the main thread then compares
them with results computed by one thread alone. Every test here fails on the code before the fixes
(per-thread key capture, the memory's lock, the lock around faiss's process-wide block sizes); measured
there: (a) ~395 of 400 forwards raise, (b) ~110 of 120, (c) 6-16 of 120 raise IndexError (or the editing
thread's own capture fails), (d) ~85 of 112 searches run with another search's block sizes and the
defaults are left changed.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time

import pytest
import torch
from conftest import make_base, make_pixel_dataset, random_pixels
from lm_helpers import EXPECTED_LAYER, VOCAB, distinct_sequences, tiny_base

from resmem import ResMemWrapper
from resmem.hooks import EmbeddingCapture, default_decoder_key_layer

JOIN_TIMEOUT_S = 120
FAISS_GLOBALS = ("distance_compute_blas_threshold", "distance_compute_blas_query_bs", "distance_compute_blas_database_bs")


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """One torch / faiss intra-op thread per Python thread (as a threaded server would set), restored after.

    The thread-safety questions here are about Python threads; with the default OpenMP teams, 8 Python threads
    each starting 2-thread parallel regions on 2 shared cores spin-wait on each other's barriers (measured:
    this file took 30-38 s instead of 5-7 s with `OMP_WAIT_POLICY=PASSIVE`, and ~5 s with this fixture).
    """
    try:
        import faiss
    except ImportError:
        faiss = None
    previous = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    if faiss:
        faiss.omp_set_num_threads(previous[1])
    torch.set_num_threads(previous[0])


def run_threads(work, n_threads: int) -> tuple[list, list]:
    """Run `work(i, barrier)` in `n_threads` threads; return (results per thread, exceptions).

    `work` calls `barrier.wait()` right before its loop so that all threads start together.
    """
    barrier = threading.Barrier(n_threads, timeout=JOIN_TIMEOUT_S)
    results: list = [None] * n_threads
    errors: list = []

    def target(i):
        try:
            results[i] = work(i, barrier)
        except Exception as err:  # collected and reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a worker thread did not finish within the timeout"
    return results, errors


def faiss_globals() -> dict:
    faiss = pytest.importorskip("faiss")
    return {name: getattr(faiss.cvar, name) for name in FAISS_GLOBALS if hasattr(faiss.cvar, name)}


@pytest.fixture
def faiss_defaults():
    """Put faiss's block sizes at their defaults (4096 x 1024 tile) for the test, and back afterwards.

    Starting from the defaults makes a leaked temporary value visible whatever ran before (a leaked
    `query_bs = 1` would otherwise mask later leaks: the tile only ever shrinks the query block).
    """
    faiss = pytest.importorskip("faiss")
    saved = faiss_globals()
    faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = 4096, 1024
    yield faiss_globals()
    for name, value in saved.items():
        setattr(faiss.cvar, name, value)


@contextlib.contextmanager
def slow_after(module: torch.nn.Module, seconds: float = 1e-3):
    """Sleep (releasing the GIL) after `module` runs, in every forward, while the block is active.

    Stands in for the compute that follows the key layer in a bigger model (in an LM, the last block's MLP
    and the head): the tiny test models end right after it, which leaves other threads almost no time to
    run through the module while a capture is still attached. Added and removed by the test, like a user's hook.
    """
    handle = module.register_forward_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def slow_faiss_search(monkeypatch):
    """Make every faiss search sleep 1 ms (releasing the GIL, as faiss does) while its block sizes are set.

    Stands in for a search over a large memory (the test memories have 60 entries and search in
    microseconds), so that other threads run while one search is in progress. Returns a list that receives
    `(num_queries, block sizes seen after the sleep)` of every search, to check that no search saw another's.
    """
    pytest.importorskip("faiss")
    import resmem.index

    original = resmem.index._blas_tile_for
    seen = []

    @contextlib.contextmanager
    def tile_then_sleep(faiss, num_queries):
        with original(faiss, num_queries):
            time.sleep(1e-3)
            cvar = faiss.cvar
            seen.append((num_queries, (cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs)))
            yield

    monkeypatch.setattr(resmem.index, "_blas_tile_for", tile_then_sleep)
    return seen


def _fields(out) -> tuple[torch.Tensor, ...]:
    return out.scores, out.logits, out.base_logits, out.residual


def _count_mismatches(results, expected) -> tuple[int, int]:
    """`results[i]`: list of (input number, output fields or the exception raised); `expected[i][input number]`
    the reference fields. Returns (forwards that raised, forwards whose outputs differ)."""
    raised = differ = 0
    for i, runs in enumerate(results):
        for which, fields in runs or []:
            if isinstance(fields, Exception):
                raised += 1
            else:
                differ += not all(torch.equal(a, b) for a, b in zip(fields, expected[i][which]))
    return raised, differ


def _call(fn):
    """`fn()`, or the exception it raised (so that one failing forward does not stop a thread's loop)."""
    try:
        return fn()
    except Exception as err:
        return err


# ------------------------------------------------------------------------------------ image model
N_THREADS, N_FORWARDS = 8, 50
N_EDIT_FORWARDS = 30


@pytest.fixture(scope="module")
def image_model():
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=4, sigma=0.8, temperature=1.3)
    model.build_memory(make_pixel_dataset(60, seed=0), batch_size=32)
    return model


def _thread_inputs(i: int) -> list[torch.Tensor]:
    """Two inputs per thread, batch size `i + 1` (each thread a different one)."""
    return [torch.from_numpy(random_pixels(i + 1, seed=100 + 10 * i + j)) for j in range(2)]


def _forward_many(models, inputs, n_forwards):
    """Work for `run_threads`: thread i runs `n_forwards` forwards of `models[i]` on its inputs, alternating."""

    def work(i, barrier):
        runs = []
        with torch.inference_mode():  # grad mode is per thread
            barrier.wait()
            for step in range(n_forwards):
                which = step % len(inputs[i])
                runs.append((which, _call(lambda: _fields(models[i](pixel_values=inputs[i][which])))))
        return runs

    return work


def _single_thread(model, inputs):
    with torch.inference_mode():
        return [[_fields(model(pixel_values=x)) for x in per_thread] for per_thread in inputs]


def test_image_forwards_in_threads_equal_single_thread_results(image_model):
    """(a) 8 threads x 50 forwards on ONE model, batch sizes 1..8: every output bit-identical to one thread alone."""
    inputs = [_thread_inputs(i) for i in range(N_THREADS)]
    expected = _single_thread(image_model, inputs)
    with slow_after(image_model.base.classifier):
        results, errors = run_threads(_forward_many([image_model] * N_THREADS, inputs, N_FORWARDS), N_THREADS)
    raised, differ = _count_mismatches(results, expected)
    assert not errors and sum(len(r) for r in results) == N_THREADS * N_FORWARDS
    assert raised == differ == 0, (
        f"of {N_THREADS * N_FORWARDS} forwards {raised} raised and {differ} differ from the single-thread result"
    )


def test_faiss_global_block_sizes_unchanged_by_concurrent_forwards(image_model, faiss_defaults, slow_faiss_search):
    """(d) faiss's process-wide BLAS block sizes read the same before and after concurrent searches.

    Each thread has its own copy of the model (so only the process-wide faiss settings are shared) and its
    own batch size, for which the search temporarily sets other block sizes.
    """
    models = [copy.deepcopy(image_model) for _ in range(N_THREADS)]
    inputs = [_thread_inputs(i) for i in range(N_THREADS)]
    expected = _single_thread(image_model, inputs)
    before = faiss_globals()
    assert before == faiss_defaults and len(before) == 3
    results, errors = run_threads(_forward_many(models, inputs, 12), N_THREADS)  # each search sleeps under the lock
    after = faiss_globals()
    assert not errors, errors[:1]
    assert after == before, f"faiss globals changed by concurrent forwards: {before} -> {after}"
    # while a search ran, faiss held that search's own tile (from the defaults: B x 4M/B), not another thread's
    assert len(slow_faiss_search) >= N_THREADS * 12  # (and the single-thread reference forwards)
    wrong = [(n, got) for n, got in slow_faiss_search if got != (n, max(1024, 4096 * 1024 // n))]
    assert not wrong, f"{len(wrong)} of {len(slow_faiss_search)} searches ran with another search's block sizes"
    assert _count_mismatches(results, expected) == (0, 0)
    # and a single forward leaves them unchanged as well
    with torch.inference_mode():
        image_model(pixel_values=inputs[3][0])
    assert faiss_globals() == before


def test_forwards_while_another_thread_edits_the_memory(image_model, slow_faiss_search):
    """(c) forwards in 4 threads while a 5th adds and removes entries: no exception, and every output
    equals the output for the memory without (60 entries) or with (72) the added ones, never a half-edited memory."""
    model = copy.deepcopy(image_model)
    extra = make_pixel_dataset(12, seed=7)
    extra_ids = list(range(1000, 1012))
    inputs = [_thread_inputs(i) for i in range(4)]
    without = _single_thread(model, inputs)
    model.add_to_memory(extra, example_ids=extra_ids, batch_size=16)
    with_extra = _single_thread(model, inputs)
    model.remove_from_memory(extra_ids)
    assert _count_mismatches([[(0, without[i][0])] for i in range(4)], _single_thread(model, inputs)) == (0, 0)
    forward = _forward_many([model] * 4, inputs, N_EDIT_FORWARDS)
    edits = []

    def work(i, barrier):
        if i < 4:
            return forward(i, barrier)
        barrier.wait()
        for _ in range(6):
            model.add_to_memory(extra, example_ids=extra_ids, batch_size=16)
            edits.append(len(model.memory))
            model.remove_from_memory(extra_ids)
            edits.append(len(model.memory))
        return []

    results, errors = run_threads(work, 5)
    assert not errors, f"{len(errors)} threads raised, first: {errors[0]!r}"
    assert edits == [72, 60] * 6
    raised = [fields for runs in results[:4] for _, fields in runs if isinstance(fields, Exception)]
    assert not raised, f"{len(raised)} of {4 * N_EDIT_FORWARDS} forwards raised, first: {raised[0]!r}"
    bad = 0
    for i, runs in enumerate(results[:4]):
        for which, fields in runs:
            bad += not any(all(torch.equal(a, b) for a, b in zip(fields, ref[i][which])) for ref in (without, with_extra))
    assert bad == 0, f"{bad} of {4 * N_EDIT_FORWARDS} forwards match neither the memory before nor after an edit"


def test_capture_ignores_forwards_of_other_threads():
    """A capture records only the forward of the thread that entered it, even while another thread's forward
    runs through the same module (forced deterministically: the other forward runs inside this one)."""
    base = make_base("resnet", seed=0)
    mine, other = torch.from_numpy(random_pixels(2, 1)), torch.from_numpy(random_pixels(5, 2))
    module = dict(base.named_modules())["classifier.1"]
    owner = threading.get_ident()

    def run_other_forward_now(module, args, output):
        if threading.get_ident() == owner:  # after the capture recorded: pause until another thread's forward ran
            t = threading.Thread(target=lambda: base(pixel_values=other), daemon=True)
            t.start()
            t.join(JOIN_TIMEOUT_S)

    capture = EmbeddingCapture(base, "classifier.1:input")
    with torch.no_grad():
        with capture:
            reference = base(pixel_values=mine)
        alone = capture.get()
        handle = module.register_forward_hook(run_other_forward_now)
        try:
            with capture:
                base(pixel_values=mine)
        finally:
            handle.remove()
    assert torch.equal(capture.get(), alone) and capture.get().shape[0] == 2
    assert reference.logits.shape == (2, 5)


def test_default_layer_probe_ignores_forwards_of_other_threads():
    """The default-layer discovery probe finds the right layer while another thread's forward (other shape)
    runs through the same blocks in the middle of the probe."""
    base = tiny_base("llama")
    owner = threading.get_ident()
    ran = []

    def run_other_forward_now(module, args):
        if threading.get_ident() == owner and not ran:
            ran.append(True)
            other = distinct_sequences(3, 5)
            t = threading.Thread(target=lambda: base(input_ids=other, use_cache=False), daemon=True)
            t.start()
            t.join(JOIN_TIMEOUT_S)

    # after the probe's last block ran: another thread's forward (another shape) passes through its hooks
    handle = base.model.norm.register_forward_pre_hook(run_other_forward_now)
    try:
        with torch.no_grad():
            layer = default_decoder_key_layer(base, 32, 2)
    finally:
        handle.remove()
    assert ran and layer == EXPECTED_LAYER["llama"]


# ------------------------------------------------------------------------------------ causal LM
@pytest.fixture(scope="module")
def lm_model():
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=4, sigma=0.5, temperature=1.3)
    model.build_memory(distinct_sequences(3, 30), window=12, stride=8, residual_top_m=16, batch_size=4)
    return model


def test_causal_lm_forwards_and_generate_in_threads_equal_sequential(lm_model):
    """(b) 6 threads x 20 forwards (batch i+1, length 4+i) on one causal LM, then greedy `generate` with the KV
    cache in 4 threads: every output bit-identical to the sequential result."""
    n_threads, n_forwards = 6, 20
    inputs = [[distinct_sequences(i + 1, 4 + i, seed=50 + 10 * i + j) for j in range(2)] for i in range(n_threads)]

    def lm_fields(out):
        return out.scores, out.logits, out.base_logits, out.residual

    with torch.inference_mode():
        expected = [[lm_fields(lm_model(input_ids=x)) for x in per_thread] for per_thread in inputs]

    def work(i, barrier):
        runs = []
        with torch.inference_mode():
            barrier.wait()
            for step in range(n_forwards):
                runs.append((step % 2, _call(lambda: lm_fields(lm_model(input_ids=inputs[i][step % 2])))))
        return runs

    with slow_after(lm_model.base.transformer.h[-1].mlp):  # the key layer is this block's ln_2, before the MLP
        results, errors = run_threads(work, n_threads)
    raised, differ = _count_mismatches(results, expected)
    assert not errors and raised == differ == 0, (
        f"of {n_threads * n_forwards} forwards {raised} raised and {differ} differ from the sequential result"
    )
    assert results[0][0][1][0].shape == (1, 4, VOCAB)

    prompts = [distinct_sequences(1 + i % 2, 3 + i, seed=90 + i) for i in range(4)]
    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    sequential = [lm_model.generate(p, **generate) for p in prompts]

    def gen_work(i, barrier):
        barrier.wait()
        return [lm_model.generate(prompts[i], **generate) for _ in range(2)]

    generated, errors = run_threads(gen_work, 4)
    assert not errors, f"{len(errors)} threads raised, first: {errors[0]!r}"
    assert all(torch.equal(g, sequential[i]) for i, runs in enumerate(generated) for g in runs)


# ------------------------------------------------------------------------------------ copies
def test_memory_lock_survives_deepcopy_and_device_moves(image_model):
    """Each copy of the model gets its own memory lock; deep copies, pickles and `.to()` keep forwards working."""
    import pickle

    copied = copy.deepcopy(image_model).to("cpu")
    assert copied.memory._lock is not image_model.memory._lock
    restored = pickle.loads(pickle.dumps(image_model.memory))
    x = torch.from_numpy(random_pixels(3, 4))
    with torch.inference_mode():
        assert torch.equal(copied(pixel_values=x).scores, image_model(pixel_values=x).scores)
    with restored._lock:  # a usable lock after unpickling
        assert len(restored) == len(image_model.memory)
