"""Finding a user's documents and turning each one into located sections of text.

A *section* is the unit a citation can point at: a Markdown/reST/HTML heading path ("Install > GPU"), a
notebook cell ("cell 3"), a PDF page ("page 2"), a top-level Python definition ("def main"). The chunker
later cuts sections into chunks; it never crosses a section boundary, so every chunk has one location.

Loaders are pure functions of a file's bytes, which is what lets `update` trust a content hash.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..core.errors import SageError

#: Folder names never indexed: dependency trees and build output (hidden folders are skipped too).
SKIPPED_DIRS = frozenset({"node_modules", "build", "dist", "__pycache__"})
SKIPPED_DIR_SUFFIXES = (".egg-info",)

#: Extensions known to be binary; anything else is sniffed (a NUL byte or invalid UTF-8 means binary).
BINARY_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .webp .tiff .svgz .zip .gz .tgz .bz2 .xz .7z .tar .whl .egg .so .dll "
    ".dylib .exe .bin .o .a .pyc .pyo .class .jar .npy .npz .pt .pth .safetensors .onnx .pkl .pickle .parquet "
    ".arrow .feather .h5 .hdf5 .sqlite .db .mp3 .mp4 .wav .ogg .flac .mov .avi .mkv .woff .woff2 .ttf .otf "
    ".eot .faiss .docx .xlsx .pptx .doc .xls .ppt".split()
)


@dataclass(frozen=True)
class Section:
    """A stretch of a file's text that one citation location describes ("" when the file has no structure)."""

    text: str
    location: str


# ---------------------------------------------------------------------------------------------- discovery


def _skipped(relative: Path) -> bool:
    """Whether a path below a searched root lies in a hidden, dependency or build folder (or is hidden)."""
    return any(
        part.startswith(".") or part in SKIPPED_DIRS or part.endswith(SKIPPED_DIR_SUFFIXES)
        for part in relative.parts
    )


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: skip rules apply only below it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand(pattern: str) -> tuple[Path, list[Path]]:
    """The root a pattern searches and the document files it names today (sorted, absolute).

    A folder is searched recursively; a glob may use ``**``; a file named explicitly is always taken,
    even if hidden, because the user asked for it. A symlink found in a folder or by a glob is read through
    but named by its own path below the root, wherever it points.
    """
    path = Path(pattern).expanduser()
    if not glob.has_magic(pattern):
        path = path.resolve()
        if path.is_file():
            return path.parent, [path]
        if path.is_dir():
            found = []
            for folder, dirs, files in os.walk(path):
                rel = Path(folder).relative_to(path)
                dirs[:] = sorted(d for d in dirs if not _skipped(rel / d))
                found += [Path(folder) / f for f in sorted(files) if not _skipped(rel / f)]
            return path, [f for f in found if is_document(f)]
        return path, []
    # Matches stay where the glob found them (a symlink keeps its own name, as in a folder walk): resolving
    # them would move a link to a file elsewhere out of the root its citations are relative to.
    root = Path(os.path.abspath(_glob_root(str(path))))
    matches = {Path(os.path.abspath(m)) for m in glob.glob(str(path), recursive=True)}
    if matches:  # `..` after a wildcard can climb above the fixed part
        root = Path(os.path.commonpath([root, *matches]))
    real = root.resolve()
    files = sorted(real / m.relative_to(root) for m in matches
                   if m.is_file() and not _skipped(m.relative_to(root)) and is_document(m))
    return real, files


def discover(patterns: Iterable[str]) -> tuple[Path, list[Path]]:
    """All document files the patterns name, and the common root their citations are shown relative to."""
    roots, files = [], set()
    for pattern in patterns:
        root, found = expand(pattern)
        roots.append(root)
        files.update(found)
    if not roots:
        raise SageError("No paths given. Name the folders, files or globs to index, e.g. `sage index add docs ./docs`.")
    return Path(os.path.commonpath([str(r) for r in roots])), sorted(files)


def is_document(path: Path) -> bool:
    """True for files a loader can read: known formats, or anything that looks like UTF-8 text."""
    suffix = path.suffix.lower()
    if suffix in LOADERS:
        return True
    if suffix in BINARY_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3  # a multi-byte character cut by the 8 KiB window is still text
    return True


# ---------------------------------------------------------------------------------------------- loaders


def _decode(data: bytes) -> str:
    """UTF-8 with a BOM tolerated; undecodable bytes become U+FFFD rather than failing the whole index."""
    return data.decode("utf-8-sig", errors="replace")


def _split_at_headings(text: str, headings: list[tuple[int, int, str]]) -> list[Section]:
    """Cut text at heading offsets; each section's location is the path of headings above it.

    ``headings`` holds (character offset, level, title). The text before the first heading keeps the empty
    location; the heading line itself starts its section, so no character is lost.
    """
    sections, stack = [], []  # stack of (level, title)
    bounds = [0] + [offset for offset, _, _ in headings] + [len(text)]
    locations = [""]
    for _, level, title in headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        locations.append(" > ".join(t for _, t in stack))
    for start, end, location in zip(bounds, bounds[1:], locations):
        if text[start:end].strip():
            sections.append(Section(text[start:end], location))
    return sections


_FENCE = re.compile(r"^(```|~~~)")
_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
#: Lines that start another block (list item, quote, table row) and so end a paragraph: CommonMark reads
#: such a block followed by ``---`` as that block plus a thematic break, not as a heading.
_BLOCK_START = re.compile(r"^ {0,3}(?:[-+*>|]|\d+[.)])(?:[ \t]|$)")
_INDENTED_CODE = re.compile(r"^(?: {4}|\t)")


def load_markdown(data: bytes) -> list[Section]:
    """Sections per heading: ATX (``#`` to ``######``) and Setext (a paragraph underlined by ``===`` for
    level 1 or ``---`` for level 2), ignoring ``#`` and underline lines inside fenced code and front matter."""
    text = _decode(data)
    lines = text.splitlines(keepends=True)
    headings, offset, fence = [], 0, None
    paragraph: list[str] = []  # lines of the paragraph being read, which an underline turns into a heading
    paragraph_at = 0
    skip = _front_matter_lines(lines)
    for number, line in enumerate(lines):
        stripped = line.rstrip("\r\n")
        opener = _FENCE.match(stripped.lstrip())
        if number < skip:
            pass
        elif opener:
            fence = None if fence == opener.group(1) else (fence or opener.group(1))
            paragraph = []
        elif fence is not None:
            pass
        elif (match := _ATX.match(stripped)) is not None:
            headings.append((offset, len(match.group(1)), match.group(2).strip()))
            paragraph = []
        elif (underline := _SETEXT.match(stripped)) is not None:  # without a paragraph: a thematic break
            if paragraph:
                level = 1 if underline.group(1)[0] == "=" else 2
                headings.append((paragraph_at, level, " ".join(part.strip() for part in paragraph)))
            paragraph = []
        elif not stripped.strip() or _BLOCK_START.match(stripped) or (not paragraph and _INDENTED_CODE.match(stripped)):
            paragraph = []
        else:
            if not paragraph:
                paragraph_at = offset
            paragraph.append(stripped)
        offset += len(line)
    return _split_at_headings(text, headings)


def _front_matter_lines(lines: list[str]) -> int:
    """How many leading lines are YAML front matter (``---`` ... ``---``), whose closing line is no heading."""
    if not lines or lines[0].rstrip() != "---":
        return 0
    for number, line in enumerate(lines[1:], start=1):
        if line.rstrip() in ("---", "..."):
            return number + 1
    return 0


_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")


def load_rst(data: bytes) -> list[Section]:
    """Sections per reStructuredText title: a line underlined (optionally overlined) by punctuation.

    reST has no fixed levels; as in docutils, each adornment style gets the next level when first seen.
    """
    text = _decode(data)
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    styles: list[tuple[str, bool]] = []
    headings = []
    for i in range(1, len(lines)):
        under, title = lines[i].rstrip(), lines[i - 1].strip()
        match = _RST_ADORNMENT.match(under)
        if not match or not title or _RST_ADORNMENT.match(title) or len(under) < len(title):
            continue
        over = i >= 2 and lines[i - 2].rstrip() == under
        style = (match.group(1), over)
        if style not in styles:
            styles.append(style)
        start = i - 2 if over else i - 1
        headings.append((offsets[start], styles.index(style) + 1, title))
    return _split_at_headings(text, headings)


def load_text(data: bytes) -> list[Section]:
    """Plain text: one section without a location (the chunker still cuts it)."""
    text = _decode(data)
    return [Section(text, "")] if text.strip() else []


_PY_DEF = re.compile(r"^(?:@.*\n)*(?P<kind>async[ \t]+def|def|class)[ \t]+(?P<name>\w+)", re.M)


def load_python(data: bytes) -> list[Section]:
    """Sections per top-level ``def``/``class`` (decorators included), so a hit names the definition."""
    text = _decode(data)
    headings = []
    for match in _PY_DEF.finditer(text):
        kind = "class" if match["kind"] == "class" else "def"
        headings.append((match.start(), 1, f"{kind} {match['name']}"))
    return _split_at_headings(text, headings)


def load_notebook(data: bytes) -> list[Section]:
    """One section per non-empty cell, located as ``cell N`` (1-based, as a reader counts); outputs are skipped."""
    try:
        notebook = json.loads(_decode(data))
        cells = notebook["cells"]
    except (ValueError, KeyError, TypeError):
        raise SageError(
            "not a readable Jupyter notebook (no `cells` list); repair it or move it out of the indexed paths."
        ) from None
    sections = []
    for number, cell in enumerate(cells, start=1):
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else str(source)
        if text.strip():
            sections.append(Section(text, f"cell {number}"))
    return sections


class _HTMLText(HTMLParser):
    """Visible text of an HTML page with the offsets of its h1..h6 headings."""

    BLOCKS = frozenset("p div br li tr h1 h2 h3 h4 h5 h6 section article header footer pre table ul ol".split())
    #: Elements whose text is never shown. Not ``head``: its end tag is optional in HTML5 (the body's first
    #: element closes it), and the only text it holds is the title's.
    HIDDEN = frozenset({"script", "style", "template", "noscript", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.hidden = 0
        self.headings: list[tuple[int, int, str]] = []
        self._heading: tuple[int, int] | None = None  # (offset, level) of an open heading

    def _emit(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self._emit("\n")
            if len(tag) == 2 and tag[0] == "h" and tag[1].isdigit():
                self._heading = (self.length, int(tag[1]))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            if self._heading and tag == f"h{self._heading[1]}":
                offset, level = self._heading
                title = " ".join("".join(self.parts)[offset:].split())
                if title:
                    self.headings.append((offset, level, title))
                self._heading = None
            self._emit("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self._emit(data)


def load_html(data: bytes) -> list[Section]:
    """Visible text only (no scripts or styles), in sections per heading."""
    parser = _HTMLText()
    parser.feed(_decode(data))
    parser.close()
    sections = _split_at_headings("".join(parser.parts), parser.headings)
    # Block tags leave runs of blank lines; squeeze them (after splitting, so heading offsets stay valid).
    return [Section(re.sub(r"\n\s*\n", "\n\n", s.text).strip() + "\n", s.location) for s in sections]


def load_pdf(data: bytes) -> list[Section]:
    """One section per page with text, located as ``page N`` (1-based)."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as error:
        raise SageError(f"not a readable PDF ({error}); repair the file or move it out of the indexed paths.") from None
    return [Section(text, f"page {n}") for n, text in enumerate(pages, start=1) if text.strip()]


Loader = Callable[[bytes], list[Section]]

LOADERS: dict[str, Loader] = {
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".rst": load_rst,
    ".txt": load_text,
    ".py": load_python,
    ".ipynb": load_notebook,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
}


def load(path: Path, data: bytes) -> list[Section]:
    """The sections of one file; the loader is chosen by extension, other text files read as plain text.

    Raises SageError (message without the path: the caller knows it) for a file its loader cannot parse.
    """
    return LOADERS.get(path.suffix.lower(), load_text)(data)

