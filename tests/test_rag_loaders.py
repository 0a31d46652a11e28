"""Loaders and file discovery on one small fixture of each supported type (no embedder needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sage_magic.core.errors import SageError
from sage_magic.rag import loaders

FILES = Path(__file__).parent / "fixtures" / "rag" / "files"
REPO = Path(__file__).resolve().parent.parent


def sections(name: str) -> list[tuple[str, str]]:
    path = FILES / name
    return [(s.location, s.text) for s in loaders.load(path, path.read_bytes())]


def test_markdown_keeps_heading_paths_and_ignores_fenced_hashes() -> None:
    found = sections("guide.md")
    assert [loc for loc, _ in found] == [
        "", "Install", "Install > GPU", "Install > GPU > Drivers", "Install > CPU", "Usage"
    ]
    assert "# not a heading" in dict(found)["Install > GPU"]
    assert "".join(text for _, text in found) == (FILES / "guide.md").read_text()  # nothing lost


def test_restructuredtext_levels_follow_adornment_order() -> None:
    assert [loc for loc, _ in sections("manual.rst")] == [
        "The Guide", "The Guide > Setup", "The Guide > Setup > Details", "The Guide > Usage"
    ]


def test_python_sections_per_top_level_definition_with_decorators() -> None:
    found = sections("tool.py")
    assert [loc for loc, _ in found] == ["", "def greet", "class Greeter", "def fetch"]
    assert dict(found)["def greet"].startswith("@decorator\n")


def test_notebook_cells_are_numbered_from_one_and_outputs_skipped() -> None:
    found = sections("analysis.ipynb")
    assert [loc for loc, _ in found] == ["cell 1", "cell 2", "cell 4"]  # cell 3 is empty
    assert "read_csv" in dict(found)["cell 2"]
    assert not any("OUTPUT SHOULD NOT" in text for _, text in found)


def test_html_text_only_with_heading_sections() -> None:
    found = dict(sections("page.html"))
    assert list(found) == ["Welcome", "Welcome > Details"]
    everything = " ".join(found.values())
    assert "Hello & welcome to the page." in everything
    assert "do not index" not in everything and "color: red" not in everything and "Ignored title" not in everything


def test_pdf_pages_are_numbered() -> None:
    found = sections("report.pdf")
    assert [loc for loc, _ in found] == ["page 1", "page 2"]
    assert "apples" in found[0][1] and "pears" in found[1][1]


def test_plain_text_is_one_section() -> None:
    assert sections("notes.txt") == [("", "Plain notes.\nSecond line.\n")]


def test_broken_notebook_and_pdf_raise_sage_errors() -> None:
    with pytest.raises(SageError, match="notebook"):
        loaders.load(Path("x.ipynb"), b"{not json")
    with pytest.raises(SageError, match="PDF"):
        loaders.load(Path("x.pdf"), b"%PDF-1.4 garbage")


def test_discovery_skips_hidden_build_dependency_and_binary_files(tmp_path: Path) -> None:
    keep = ["a.md", "sub/b.py", "sub/deeper/c.txt", "Makefile"]
    skip = [".hidden.md", ".git/config.md", "node_modules/x/readme.md", "build/out.md", "dist/d.md",
            "pkg/__pycache__/m.py", "pkg.egg-info/PKG-INFO", "image.png"]
    for name in keep + skip:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02binary")
    root, files = loaders.discover([str(tmp_path)])
    assert root == tmp_path.resolve()
    assert sorted(f.relative_to(root).as_posix() for f in files) == sorted(keep)


def test_globs_and_explicit_files(tmp_path: Path) -> None:
    for name in ["docs/a.md", "docs/sub/b.md", "docs/c.txt", "docs/build/d.md", "other/e.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    root, files = loaders.discover([f"{tmp_path}/docs/**/*.md", str(tmp_path / "other" / "e.md")])
    assert root == tmp_path.resolve()
    assert [f.relative_to(root).as_posix() for f in files] == ["docs/a.md", "docs/sub/b.md", "other/e.md"]


def test_importing_the_package_pulls_no_heavy_module() -> None:
    code = (
        "import sys, sage_magic.rag, sage_magic.rag.context, sage_magic.cli.index\n"
        "heavy = {'torch', 'numpy', 'faiss', 'bm25s', 'pypdf', 'sentence_transformers', 'IPython'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_a_glob_matching_a_symlink_to_a_file_outside_the_root_indexes_it_under_the_link(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.md").write_text("# Linked\n\nLinked text.\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n")
    (tmp_path / "docs" / "link.md").symlink_to(tmp_path / "outside" / "secret.md")
    root, files = loaders.discover([f"{tmp_path}/docs/*.md"])
    assert root == (tmp_path / "docs").resolve()
    # named as the glob found it, below the root citations are relative to, and read through the link
    assert [f.relative_to(root).as_posix() for f in files] == ["a.md", "link.md"]
    assert "Linked text." in files[1].read_text()
    # the same as a folder walk finds it
    assert loaders.discover([str(tmp_path / "docs")]) == (root, files)


SETEXT = """\
---
title: front matter, not a heading
---
Intro.

Install
=======

Use pip
to install it.
---------------

## Then an ATX heading

text

---

A paragraph after a thematic break
- and a list item
---
```
Fenced
------
```
Last
===
body
"""


def test_markdown_recognises_setext_headings_and_nothing_else() -> None:
    found = loaders.load_markdown(SETEXT.encode())
    assert [s.location for s in found] == [
        "", "Install", "Install > Use pip to install it.", "Install > Then an ATX heading", "Last"
    ]
    assert "".join(s.text for s in found) == SETEXT  # nothing lost


def test_html5_page_without_head_end_tag_keeps_its_text() -> None:
    page = (b"<!doctype html><html><head><meta charset=utf-8><title>Tab title</title>"
            b"<h1>Welcome</h1><p>The body text.</p><h2>More</h2><p>Details.</p>")
    found = [(s.location, s.text) for s in loaders.load_html(page)]
    assert [loc for loc, _ in found] == ["Welcome", "Welcome > More"]
    assert "The body text." in found[0][1] and "Details." in found[1][1]
    assert "Tab title" not in " ".join(text for _, text in found)
