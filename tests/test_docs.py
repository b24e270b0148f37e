"""Runs every Python example of README.md and docs/**/*.md.

Convention for fenced code blocks in the documentation (docs/development.md, "Documentation
examples"):

- info string exactly ``python``: a runnable example. It is executed here, each block on its own in a
  fresh namespace, so it imports what it uses and defines its own (small) tensors.
- info string exactly ``python cuda``: a runnable example that needs a CUDA device; executed where
  ``pyalign.cuda_available()``, skipped elsewhere.
- any other info string is not executed: ``text`` for signatures and listings, ``python skip`` for
  illustrative code that cannot run on its own (a TRL trainer with a model and a dataset, a
  multi-process launch), ``bash`` for shell commands.

A block that raises fails its test; a block that needs an optional dependency which is not
installed (trl, transformers, matplotlib, scikit-learn, scipy) is skipped. Test ids are
``FILE:LINE`` of the opening fence, e.g. ``README.md:123``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = "python"
RUN_CUDA = "python cuda"
OPTIONAL = {"trl", "transformers", "matplotlib", "sklearn", "scipy"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def doc_files() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md"] + (sorted(docs.rglob("*.md")) if docs.is_dir() else [])


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line of the opening fence, info string, code)`` for every fenced block of a Markdown file
    (CommonMark fences: three or more backticks or tildes, closed by a fence of the same character
    at least as long; an unclosed block runs to the end of the file)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        start, indent, fence, info = i + 1, len(m["indent"]), m["fence"], m["info"].strip()
        body = []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) \
                    and not close["info"].strip():
                break
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            i += 1
        blocks.append((start, info, "\n".join(body) + "\n"))
        i += 1
    return blocks


def runnable_blocks():
    out = []
    for path in doc_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, info, code in fenced_blocks(path):
            if info in (RUN, RUN_CUDA):
                out.append(pytest.param(rel, line, info, code, id=f"{rel}:{line}"))
    return out


BLOCKS = runnable_blocks()


def test_blocks_collected():
    """The examples are found (a broken extraction must not pass by running nothing)."""
    assert len(BLOCKS) >= 10, f"only {len(BLOCKS)} runnable python blocks found in README.md and docs/"


def test_two_commands_section():
    """README's "## The two commands" holds two one-line bash blocks (CI runs them verbatim)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## The two commands\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, 'README.md: no "## The two commands" section'
    bash = re.findall(r"^```bash\n(.*?)^```$", m.group(1), re.S | re.M)
    assert len(bash) == 2, f"expected two ```bash blocks in the section, found {len(bash)}"
    for cmd in bash:
        assert cmd.count("\n") == 1, f"each command must be a single line, got {cmd!r}"
    assert "pyalign.bench" in bash[0] and "pytest" in bash[1]


@pytest.mark.parametrize("path,line,info,code", BLOCKS)
def test_doc_example(path, line, info, code, tmp_path, monkeypatch):
    import torch

    import pyalign

    if info == RUN_CUDA and not pyalign.cuda_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.chdir(tmp_path)  # files an example writes land in a temporary folder
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace = {"__name__": "__main__", "__file__": str(ROOT / path)}
    # padded so that a traceback names the block's own line in the Markdown file
    compiled = compile("\n" * line + code, str(ROOT / path), "exec")
    threads = torch.get_num_threads()
    try:
        exec(compiled, namespace)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"optional dependency {e.name} is not installed")
        raise
    finally:
        torch.set_num_threads(threads)
