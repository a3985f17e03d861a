"""The documentation reads as code and runs as pasted.

- Every ```python block of docs/*.md and README.md runs on its own, in a fresh namespace, in a
  scratch directory, on CPU. A block that must not run says why on the line before its fence:
  ``<!-- not run: REASON -->`` (an HTML comment: neither the site nor GitHub shows it).
- Code fits the site's content column (``WIDTH``): the lines of those blocks and of every
  docstring example (as the API pages show them).
- Docstring examples sit under an ``Examples:`` heading, the section the API pages' docstring
  parser (griffe, google style) renders as code; the built API pages show no ``>>>`` outside a
  code block (``Example:`` made an admonition of them and markdown read each ``>>>`` line as
  a nested block quote).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

# Material's content column, both sidebars shown: a 61rem grid less two 12.1rem sidebars and
# 2 x 1.2rem margins is 34.4rem; less the code block's padding (2 x 1.1765em of a 0.68rem
# font) 32.8rem, which holds 80 characters of Roboto Mono (0.6em each, 0.408rem) before the
# block scrolls.
WIDTH = 80

NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>.*?) -->$")
DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:.+$")  # griffe trims these from what it renders


class Block:
    def __init__(self, path: Path, line: int, lines: list[str], not_run: str | None):
        self.path, self.line, self.lines, self.not_run = path, line, lines, not_run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks() -> list[Block]:
    """Each ```python block: where its code starts, its lines, and its not-run reason if any."""
    blocks = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").split("\n")
        index = 0
        while index < len(lines):
            if lines[index].strip() == "```python":
                end = index + 1
                while lines[end].strip() != "```":
                    end += 1
                before = next((line for line in reversed(lines[:index]) if line.strip()), "")
                marker = NOT_RUN.match(before.strip())
                not_run = marker.group("reason") if marker else None
                blocks.append(Block(path, index + 2, lines[index + 1 : end], not_run))
                index = end
            index += 1
    return blocks


BLOCKS = python_blocks()


def test_the_docs_hold_python_blocks_and_few_exceptions():
    assert len(BLOCKS) >= 20, [block.where for block in BLOCKS]
    not_run = [block for block in BLOCKS if block.not_run is not None]
    assert len(not_run) <= 4, [block.where for block in not_run]
    for block in not_run:
        assert len(block.not_run.strip()) >= 10, f"{block.where}: say why it does not run"


def test_each_not_run_marker_stands_before_a_python_block():
    marked = {(block.path, block.line) for block in BLOCKS if block.not_run is not None}
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, 1):
            if line.strip().startswith("<!-- not run"):
                assert NOT_RUN.match(line.strip()), f"{path.name}:{number}: <!-- not run: REASON -->"
                fence = next(n for n in range(number, len(lines)) if lines[n].strip())
                assert (path, fence + 2) in marked, f"{path.name}:{number}: no ```python block follows"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_run is None], ids=lambda b: b.where)
def test_python_block_runs_as_pasted(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (runs/, checkpoints/) lands here
    code = compile("\n".join(block.lines) + "\n", block.where, "exec")
    exec(code, {"__name__": "__main__"})


def test_python_blocks_fit_the_content_column():
    wide = [
        f"{block.where.rsplit(':', 1)[0]}:{block.line + offset} ({len(line)})"
        for block in BLOCKS
        for offset, line in enumerate(block.lines)
        if len(line) > WIDTH
    ]
    assert not wide, f"code lines over {WIDTH} columns: {wide}"


def docstrings() -> list[tuple[Path, int, str]]:
    """Every docstring of engine_opt as written: its file, first line and raw text."""
    found = []
    for path in sorted((ROOT / "engine_opt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0] if node.body else None
                if (
                    isinstance(first, ast.Expr)
                    and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)
                ):
                    found.append((path, first.lineno, inspect.cleandoc(first.value.value)))
    return found


def examples_sections(text: str) -> list[tuple[int, list[tuple[int, str]]]]:
    """Each ``Examples:`` section of a docstring: its heading's indent, and its (line, text) lines."""
    sections, lines, index = [], text.split("\n"), 0
    while index < len(lines):
        line = lines[index]
        if line.strip() == "Examples:":
            indent, body = len(line) - len(line.lstrip()), []
            index += 1
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                body.append((index, lines[index]))
                index += 1
            sections.append((indent, body))
        else:
            index += 1
    return sections


def test_docstring_examples_sit_under_an_examples_heading():
    outside = []
    for path, first, text in docstrings():
        inside = {n for _, body in examples_sections(text) for n, _ in body}
        for number, line in enumerate(text.split("\n")):
            if line.lstrip().startswith(">>>") and number not in inside:
                outside.append(f"{path.relative_to(ROOT)}:{first + number}")
    assert not outside, f">>> lines outside an Examples: section (the site shows them as text): {outside}"


def test_docstring_examples_fit_the_content_column():
    wide = []
    for path, first, text in docstrings():
        for indent, body in examples_sections(text):
            for number, line in body:
                shown = DOCTEST_FLAGS.sub("", line)[indent + 4 :]
                if len(shown) > WIDTH:
                    wide.append(f"{path.relative_to(ROOT)}:{first + number} ({len(shown)})")
    assert not wide, f"docstring example lines over {WIDTH} columns: {wide}"


class _Text(HTMLParser):
    """An HTML page's text inside ``<pre>``/``<code>`` and outside, and its ``<blockquote>`` count."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # &gt;&gt;&gt; reads as >>>
        self.depth, self.blockquotes = 0, 0
        self.code: list[str] = []
        self.prose: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "code"):
            if not self.depth:
                self.code.append("\n")  # each element its own lines
            self.depth += 1
        elif tag == "blockquote":
            self.blockquotes += 1

    def handle_endtag(self, tag):
        if tag in ("pre", "code") and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        (self.code if self.depth else self.prose).append(data)


def _documented(identifier: str) -> object:
    """The object a ``::: identifier`` line names."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(identifier)


@pytest.mark.slow
def test_api_pages_show_docstring_examples_as_code(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    pages = sorted((ROOT / "docs" / "api").glob("*.md"))
    assert pages
    for page in pages:
        html = _Text()
        html.feed((site / "api" / page.stem / "index.html").read_text(encoding="utf-8"))
        prose = "".join(html.prose)
        lines = [line for line in prose.split("\n") if ">>>" in line]
        assert not lines, f"api/{page.stem}: >>> outside a code block: {lines[:5]}"
        assert html.blockquotes == 0, f"api/{page.stem}: {html.blockquotes} block quotes (a >>> line read as text)"
        code = {line.strip() for line in "".join(html.code).split("\n")}
        identifiers = re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), flags=re.M)
        shown = 0
        for identifier in identifiers:
            doc = inspect.getdoc(_documented(identifier)) or ""
            for line in doc.split("\n"):
                if line.strip().startswith(">>>"):
                    assert DOCTEST_FLAGS.sub("", line).strip() in code, f"{identifier}: {line.strip()}"
                    shown += 1
        assert shown, f"api/{page.stem}: no docstring examples found"
