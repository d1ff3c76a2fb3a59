"""The README's Python snippets run as written, on tiny models, with no network and no Hugging Face Hub.

Every ```python block of README.md is compiled and executed exactly as it stands in the file (no text is
substituted); the test only prepares the working directory the snippets talk about. Fence convention
(GitHub highlights by the first word of the info string only, so readers just see Python):

- ```python            runs in a fresh namespace;
- ```python continued  runs in the namespace of the executed block before it (the README says what it
                       continues), so the variables of that snippet are there;
- ```python no-run     is never executed: only for calls that need the Hub (`push_to_hub`, a Hub id
                       'org/name'); every line of such a block must be one (checked below).

Blocks run in README order, in one temporary working directory that holds what the snippets name:
`my-finetuned-classifier/` (a tiny transformers ResNet with 3 labels and an image processor), `data/` (an
imagefolder with train/validation/test splits of 16x16 PNGs), `my-causal-lm/` (a tiny Llama with a word
tokenizer) and `train.txt` / `validation.txt` / `test.txt` (paragraphs of those words).
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import transformers
from datasets.utils.logging import disable_progress_bar as disable_datasets_progress_bar
from PIL import Image
from transformers import ViTImageProcessor

from conftest import make_base, seeded
from lm_helpers import tiny_config, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KINDS = {"": "fresh", "continued": "continued", "no-run": "no-run"}
CLASSES = ("cat", "dog", "fish")  # imagefolder labels are the sorted folder names
SPLIT_SIZES = {"train": 60, "validation": 15, "test": 15}  # train > 50: the snippets tune k up to 50
WORDS = 100  # word tokenizer w0..w99 (+ [UNK], [PAD]) inside the tiny LM's vocabulary of 128
TEXT_PARAGRAPHS = {"train": 12, "validation": 4, "test": 4}  # 12 x 24 words: > 100 entries for k=100


@dataclass
class Block:
    """One fenced block of README.md: its info string's kind, first code line (1-based) and code."""

    language: str
    kind: str
    line: int
    code: str
    heading: str


@dataclass
class Chain:
    """A fresh ```python block and the ```python continued blocks that follow it (one namespace)."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.blocks[0].heading} (README.md:{self.blocks[0].line})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of `text` with its language, kind and position; raises on an unknown python kind."""
    blocks, heading, fence = [], "", None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        match = re.match(r"^```(\S*)\s*(.*)$", line)
        if not match:
            if fence is not None:
                fence["lines"].append(line)
            continue
        if fence is None:
            fence = {"language": match.group(1), "info": match.group(2).strip(), "line": number + 1, "lines": []}
            continue
        language, info = fence["language"], fence["info"]
        if language == "python" and info not in KINDS:
            raise ValueError(f"README.md:{fence['line'] - 1}: unknown fence '```python {info}'; use one of {list(KINDS)}")
        kind = KINDS.get(info, "fresh") if language == "python" else "other"
        blocks.append(Block(language, kind, fence["line"], "\n".join(fence["lines"]) + "\n", heading))
        fence = None
    if fence is not None:
        raise ValueError(f"README.md:{fence['line'] - 1}: unclosed code fence")
    return blocks


def python_chains(blocks: list[Block]) -> list[Chain]:
    """Executed python blocks grouped into namespaces; a `continued` block needs an executed block before it."""
    chains: list[Chain] = []
    for block in blocks:
        if block.language != "python" or block.kind == "no-run":
            continue
        if block.kind == "continued":
            if not chains:
                raise ValueError(f"README.md:{block.line}: a '```python continued' block with nothing to continue")
            chains[-1].blocks.append(block)
        else:
            chains.append(Chain([block]))
    return chains


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
CHAINS = python_chains(BLOCKS)


# ---------------------------------------------------------------------------------------------
def write_image_folder(root: Path) -> None:
    """`root/<split>/<class>/<i>.png`: 16x16 RGB images whose mean colour depends on the class."""
    rng = np.random.default_rng(0)
    for split, n in SPLIT_SIZES.items():
        for i in range(n):
            label = i % len(CLASSES)
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.normal(60 + 70 * label, 40, (16, 16, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def write_classifier(folder: Path) -> None:
    """A tiny random transformers ResNet over `CLASSES`, saved with an image processor that resizes to 16x16."""
    base = make_base("resnet", num_labels=len(CLASSES))
    base.config.id2label = dict(enumerate(CLASSES))
    base.config.label2id = {name: i for i, name in enumerate(CLASSES)}
    base.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)


def write_causal_lm(folder: Path) -> None:
    """A tiny random Llama (vocabulary 128) with a word-level tokenizer over w0..w99. It takes 256 positions,
    the paper's window that `build_memory` uses by default (rotary embeddings: no extra weights)."""
    config = tiny_config("llama")
    config.max_position_embeddings = 256
    with seeded(0):
        transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)


def write_texts(root: Path) -> None:
    """train/validation/test .txt files: paragraphs (blank-line separated) of 24 words from a repetitive stream."""
    rng = np.random.default_rng(1)
    for split, paragraphs in TEXT_PARAGRAPHS.items():
        # Words follow w -> w + 1 (mod 20) most of the time, so a memory has something to recall.
        lines = []
        for _ in range(paragraphs):
            start = int(rng.integers(0, 20))
            words = [(start + j) % 20 if rng.random() < 0.8 else int(rng.integers(20, WORDS)) for j in range(24)]
            lines.append(" ".join(f"w{w}" for w in words))
        (root / f"{split}.txt").write_text("\n\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme_workspace")
    write_image_folder(root / "data")
    write_classifier(root / "my-finetuned-classifier")
    write_causal_lm(root / "my-causal-lm")
    write_texts(root)
    return root


def refuse_connection(*args, **kwargs):
    raise OSError("network access attempted by a README snippet; mark Hub-only code ```python no-run")


def run_block(block: Block, namespace: dict) -> None:
    """Execute `block` as written; blank lines in front keep tracebacks on README.md's own line numbers."""
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - the README's own snippets


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", CHAINS, ids=[chain.name for chain in CHAINS])
def test_readme_python_snippet_runs_as_written(chain, workspace, monkeypatch):
    # Offline, and any connection refused: a snippet that needs the Hub fails at once (mark it no-run).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(workspace / ".datasets_cache"))
    disable_datasets_progress_bar()
    namespace = {"__name__": "__readme__"}
    for block in chain.blocks:
        run_block(block, namespace)


def test_readme_has_the_snippets_this_test_runs():
    """The Use snippet (image), the causal-LM quick start and their continuations are all executed."""
    sources = ["".join(block.code for block in chain.blocks) for chain in CHAINS]
    assert len(CHAINS) >= 2, [chain.name for chain in CHAINS]
    for needle in ("resmem.evaluate(", "model.tune(", "save_pretrained(", "from_pretrained(", "generate("):
        assert any(needle in source for source in sources), f"no executed README snippet calls {needle}"
    assert sum(block.kind == "continued" for block in BLOCKS) >= 1


def test_readme_no_run_blocks_hold_only_hub_calls():
    """A `no-run` block may not hide code that could run here: every line is a Hub call or a comment."""
    hub_line = re.compile(r"push_to_hub\(|[\"'][\w.-]+/[\w.-]+[\"']")
    no_run = [block for block in BLOCKS if block.kind == "no-run"]
    for block in no_run:
        for offset, line in enumerate(block.code.splitlines()):
            code = line.split("#", 1)[0].strip()
            assert not code or hub_line.search(code), f"README.md:{block.line + offset} runs without the Hub: {line!r}"


def test_readme_fence_convention_is_enforced():
    """Unknown python fence kinds and dangling continuations are errors, not silently skipped blocks."""
    with pytest.raises(ValueError, match="unknown fence"):
        readme_blocks("```python norun\nx = 1\n```\n")
    with pytest.raises(ValueError, match="nothing to continue"):
        python_chains(readme_blocks("```python continued\nx = 1\n```\n"))
    with pytest.raises(ValueError, match="unclosed"):
        readme_blocks("```python\nx = 1\n")
    chains = python_chains(readme_blocks("```python\na = 1\n```\n```python no-run\nb\n```\n```python continued\nc = a\n```\n"))
    assert [[block.code for block in chain.blocks] for chain in chains] == [["a = 1\n", "c = a\n"]]


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the test command the README gives (`make test`), and the Makefile's test target is the
    `python -m pytest -q` the README says it is."""
    commands = [line.split("#", 1)[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_commands = [c for c in commands if c and not c.startswith(("set ", "cd "))]
    two_commands = next(block for block in BLOCKS if block.heading == "Two commands" and block.language == "bash")
    readme_commands = [line.split("#", 1)[0].strip() for line in two_commands.code.splitlines()]
    assert ci_commands == ["make test"] and "make test" in readme_commands, (ci_commands, readme_commands)
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n\t(.+)$", makefile, re.M).group(1)
    assert shlex.split(recipe)[1:4] == ["-m", "pytest", "-q"], recipe
    assert "`python -m pytest -q`" in two_commands.code


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    """Every relative link of README.md names an existing file, and every '#anchor' a heading of its target."""
    text = README.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # links inside code blocks are not links
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    assert links
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else README
        assert target.exists(), f"README.md links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+\s+(.*)$", re.sub(r"^```.*?^```", "", target.read_text(encoding="utf-8"), flags=re.S | re.M), re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"README.md links to {link}: no such heading"
