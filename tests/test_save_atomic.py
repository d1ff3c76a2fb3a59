"""A save is atomic as a whole: a process killed at any point leaves the old save or the new one, never a mix.

A SIGKILL between the per-file renames of a save left a folder with the new config
beside the old memory, which loaded without error. Here a ~250 MB save runs in a forked child
process (fork, so that each kill point does not pay the 5-15 s import of torch + transformers);
`RESMEM_SAVE_PAUSE_AT` stops the child at a named point of `resmem.atomic.publish` and the test
SIGKILLs it there (one case kills it after a delay, while it writes the memory file). The folder
must then load as exactly the old or exactly the new save, and the next save removes the
hidden staging folders the killed ones left.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import sys
import time

import pytest
import torch
from conftest import make_base

from resmem import MemoryFileError, ResMemWrapper
from resmem.atomic import clean_stale_staging, default_file_mode, exchange, make_staging
from resmem.hub import base_fingerprint

if sys.platform != "linux":
    pytest.skip("fork + renameat2 crash tests run on Linux", allow_module_level=True)

ROWS, DIM = 120_000, 512  # keys alone: 120,000 x 512 float32 = 246 MB
NEW_ID_OFFSET = 10**9


def _model(k: int, id_offset: int, seed: int) -> ResMemWrapper:
    """A tiny classifier with a big in-RAM memory set directly (no embedding pass: fast)."""
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=k)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(ROWS, DIM, generator=g)
    logits = torch.randn(ROWS, 5, generator=g)
    labels = torch.randint(0, 5, (ROWS,), generator=g)
    ids = torch.arange(ROWS) + id_offset
    model.memory.set_entries(keys, logits, labels, ids, fingerprint=base_fingerprint(model.base), layer=model.config.layer)
    return model


@pytest.fixture(scope="module")
def models():
    return _model(k=4, id_offset=0, seed=1), _model(k=7, id_offset=NEW_ID_OFFSET, seed=2)


def _which(folder, old, new) -> str:
    """'old' / 'new' when the folder loads as exactly that save, 'refused' when loading refuses a mixed folder."""
    try:
        loaded = ResMemWrapper.from_pretrained(folder)
    except MemoryFileError as err:
        assert "two different saves" in str(err) or "different saves" in str(err), err
        return "refused"
    for name, model in (("old", old), ("new", new)):
        if loaded.config.k == model.config.k and torch.equal(loaded.memory.example_ids, model.memory.example_ids):
            assert torch.equal(loaded.memory.keys[::997], model.memory.keys[::997])
            assert torch.equal(loaded.memory.base_logits, model.memory.base_logits)
            return name
    raise AssertionError(f"{folder} loads as a mix: k={loaded.config.k}, ids {loaded.memory.example_ids[[0, -1]].tolist()}")


def _killed_save(model, folder, pause_at: str | None = None, delay: float | None = None, no_exchange=False, timeout=120.0) -> str:
    """Save `model` into `folder` in a forked child and SIGKILL it at `pause_at` (or after `delay` s).

    Returns what the child reached: the pause point's name, 'killed' (timed kill) or 'finished'.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_fd)
            os.dup2(write_fd, 2)
            signal.alarm(int(timeout))  # a hung child dies on its own
            if pause_at:
                os.environ["RESMEM_SAVE_PAUSE_AT"] = pause_at
            if no_exchange:
                os.environ["RESMEM_SAVE_NO_EXCHANGE"] = "1"
            model.save_pretrained(folder)
            os.write(2, b"resmem-save-finished\n")
        finally:
            os._exit(0)
    os.close(write_fd)
    reached, buffer, deadline = None, b"", time.monotonic() + (delay if delay is not None else timeout)
    try:
        while reached is None:
            left = deadline - time.monotonic()
            if left <= 0:
                reached = "killed" if delay is not None else None
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                reached = "finished"  # the child exited
                break
            buffer += chunk
            if b"resmem-save-paused " in buffer:
                reached = buffer.split(b"resmem-save-paused ")[1].split(b"\n")[0].decode()
            elif b"resmem-save-finished" in buffer:
                reached = "finished"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
    assert reached is not None, f"the save child neither paused nor finished: {buffer[-2000:]!r}"
    return reached


def _leftovers(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(".resmem-save-"))


def test_killed_saves_leave_the_old_or_the_new_save(models, tmp_path):
    old, new = models
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"user": "file"}')  # not the save's: must survive every save
    assert _which(folder, old, new) == "old"

    # Killed while writing the 250 MB memory into the staging folder (after a delay): the old save.
    assert _killed_save(new, folder, delay=0.5) in ("killed", "finished")
    if _which(folder, old, new) != "old":  # "new" when the machine was fast (anything else raised): start again
        old.save_pretrained(folder)
    # Killed with the whole new save staged and the user's files linked in, just before the swap.
    assert _killed_save(new, folder, pause_at="before-swap") == "before-swap"
    assert _which(folder, old, new) == "old"
    assert len(_leftovers(tmp_path)) >= 1  # the staged new save, hundreds of MB
    # Killed right after the one-call exchange, before the old save (now in the staging folder) was deleted.
    assert _killed_save(new, folder, pause_at="after-swap") == "after-swap"
    assert _which(folder, old, new) == "new"
    assert (folder / "tokenizer.json").read_text() == '{"user": "file"}'

    # The next save removes the folders of killed saves, but not one of a live process (this one).
    live = make_staging(str(tmp_path))
    old.save_pretrained(folder)
    assert _which(folder, old, new) == "old"
    assert _leftovers(tmp_path) == [os.path.basename(live)]
    os.rmdir(live)


def test_file_by_file_fallback_refuses_a_mixed_folder(models, tmp_path, monkeypatch):
    """Without renameat2 (other systems) files move one by one, config.json last: a kill in between is refused
    at load (config.json and the memory name different save ids; the memories have the same size, so only the
    save id tells them apart)."""
    old, new = models
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    # Rename order: README.md, model.safetensors (same base weights), resmem_memory.safetensors, config.json.
    outcomes = {}
    for point in ("fallback-1", "fallback-2", "fallback-3"):
        assert _killed_save(new, folder, pause_at=point, no_exchange=True) == point
        outcomes[point] = _which(folder, old, new)
        old.save_pretrained(folder)
    assert outcomes == {"fallback-1": "old", "fallback-2": "refused", "fallback-3": "new"}
    assert _leftovers(tmp_path) == []
    monkeypatch.setenv("RESMEM_SAVE_NO_EXCHANGE", "1")  # a complete fallback save leaves nothing behind either
    new.save_pretrained(folder)
    assert _which(folder, old, new) == "new" and _leftovers(tmp_path) == []


def test_user_files_are_kept_and_stale_save_files_dropped(tmp_path):
    small = ResMemWrapper.from_base(make_base("resnet", seed=0), k=3)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "checkpoints" / "step-1").mkdir(parents=True)
    (folder / "checkpoints" / "step-1" / "state.bin").write_bytes(b"\x00" * 10)
    os.symlink("tokenizer_config.json", folder / "alias.json")
    (folder / "resmem_index.faiss").write_bytes(b"stale index of an earlier save")
    inode = os.stat(folder / "checkpoints" / "step-1" / "state.bin").st_ino
    small.save_pretrained(folder)
    names = set(os.listdir(folder))
    assert {"tokenizer_config.json", "checkpoints", "alias.json", "config.json", "model.safetensors"} <= names
    assert "resmem_index.faiss" not in names
    assert os.readlink(folder / "alias.json") == "tokenizer_config.json"
    assert os.stat(folder / "checkpoints" / "step-1" / "state.bin").st_ino == inode  # hard link, not a copy
    assert _leftovers(tmp_path) == []


def test_saved_files_get_the_modes_of_a_normal_write(tmp_path):
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=3)
    model.memory.set_entries(torch.randn(8, 16), torch.randn(8, 5), torch.zeros(8, dtype=torch.long), torch.arange(8),
                             fingerprint=base_fingerprint(model.base), layer=model.config.layer)
    model.save_pretrained(tmp_path / "model")
    modes = {n: stat.S_IMODE(os.stat(tmp_path / "model" / n).st_mode) for n in os.listdir(tmp_path / "model")}
    assert modes == dict.fromkeys(modes, default_file_mode()), modes
    folder_mode = stat.S_IMODE(os.stat(tmp_path / "model").st_mode)
    umask = 0o666 & ~default_file_mode()
    assert folder_mode == 0o777 & ~umask, oct(folder_mode)


def test_save_into_the_working_directory_follows_it(tmp_path, monkeypatch):
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=3)
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path / "model")
    model.save_pretrained(".")
    model.save_pretrained(".")  # the exchange swapped the working directory's folder: cwd must still work
    assert os.getcwd() == str(tmp_path / "model") and "config.json" in os.listdir(".")


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "y").write_text("b")
    assert exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.listdir(tmp_path / "a") == ["y"] and os.listdir(tmp_path / "b") == ["x"]


def test_cleanup_keeps_folders_it_cannot_attribute(tmp_path):
    (tmp_path / ".resmem-save-abc").mkdir()  # an older naming scheme: unknown owner
    dead = tmp_path / ".resmem-save-00000000-999999999-xyz"  # another host's name: kept
    dead.mkdir()
    assert clean_stale_staging(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == [".resmem-save-00000000-999999999-xyz", ".resmem-save-abc"]


def test_save_into_a_mount_point_stages_inside_it(tmp_path, monkeypatch):
    """A container volume cannot be exchanged or renamed across: the save stages inside it and renames file by file."""
    import resmem.atomic

    small = ResMemWrapper.from_base(make_base("resnet", seed=0), k=3)
    small.save_pretrained(tmp_path / "volume")
    (tmp_path / "volume" / "notes.txt").write_text("user file")
    real_ismount = os.path.ismount
    monkeypatch.setattr(resmem.atomic.os.path, "ismount", lambda p: os.fspath(p) == str(tmp_path / "volume") or real_ismount(p))
    small.config.k = 5
    small.save_pretrained(tmp_path / "volume")
    assert sorted(os.listdir(tmp_path / "volume")) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert ResMemWrapper.from_pretrained(tmp_path / "volume").config.k == 5
    assert _leftovers(tmp_path) == []


def test_a_reader_racing_with_a_save_reads_the_new_save(tmp_path, monkeypatch):
    """A save that lands between a reader's reads of config.json/weights and of the memory: the save ids differ,
    and the reader loads the folder again instead of failing (or mixing, as before save ids)."""

    def small(k, offset):
        model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=k)
        model.memory.set_entries(torch.randn(8, 16), torch.randn(8, 5), torch.zeros(8, dtype=torch.long),
                                 torch.arange(8) + offset, fingerprint=base_fingerprint(model.base), layer=model.config.layer)
        return model

    first, second = small(3, 0), small(5, 100)
    first.save_pretrained(tmp_path / "model")
    original, calls = ResMemWrapper._load_memory, []

    def racing(self, *args, **kwargs):
        if not calls:
            second.save_pretrained(tmp_path / "model")
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ResMemWrapper, "_load_memory", racing)
    loaded = ResMemWrapper.from_pretrained(tmp_path / "model")
    assert len(calls) == 2 and loaded.config.k == 5
    assert torch.equal(loaded.memory.example_ids, second.memory.example_ids)
