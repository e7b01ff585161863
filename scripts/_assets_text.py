"""Turn documentation pages into plain text: HTML with html.parser, man pages with groff.

HTML: text outside navigation, scripts and styles is kept. Block elements end a line, whitespace
outside <pre> collapses to one space, and <pre> keeps its layout. Man pages: rendered by
`preconv | groff -mandoc -Tutf8` without bold or underline overstrikes, each step under `timeout 10`
because some pages send troff into an endless loop.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["ManRenderError", "html_to_text", "read_maybe_gzip", "render_man_page", "tidy_text"]

# Elements whose whole subtree is dropped.
SKIP_TAGS = frozenset({"script", "style", "nav", "head", "noscript", "template", "svg", "button"})
# Navigation bars and permalink anchors in Sphinx (Python) and DocBook (PostgreSQL, Debian Reference) output.
SKIP_CLASSES = frozenset({"related", "sphinxsidebar", "footer", "navheader", "navfooter", "headerlink", "mobile-nav"})
SKIP_ROLES = frozenset({"navigation", "search"})
BLOCK_TAGS = frozenset(
    {
        "address", "article", "blockquote", "br", "caption", "dd", "div", "dl", "dt", "figcaption", "figure",
        "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol", "p", "pre", "section", "table", "tbody", "td",
        "th", "thead", "tr", "ul",
    }
)  # fmt: skip
VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})

MAN_TIMEOUT_S = 10
_WHITESPACE = re.compile(r"\s+")
_BLANK_RUNS = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre_depth = 0

    def _newline(self) -> None:
        if self.parts and not self.parts[-1].endswith("\n"):
            self.parts.append("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            # Nested elements of the skipped tag's name are counted so the right end tag ends the skip.
            if tag == self.skip_tag:
                self.skip_depth += 1
            return

        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        skip = tag in SKIP_TAGS or classes & SKIP_CLASSES or attributes.get("role") in SKIP_ROLES
        if skip and tag not in VOID_TAGS:
            self.skip_tag, self.skip_depth = tag, 1
            return

        if tag == "pre":
            self.pre_depth += 1
        if tag in BLOCK_TAGS:
            self._newline()

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return

        if tag == "pre" and self.pre_depth > 0:
            self.pre_depth -= 1
        if tag in BLOCK_TAGS:
            self._newline()

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        if self.pre_depth == 0:
            data = _WHITESPACE.sub(" ", data)
            # A collapsed space at the start of a line is indentation from the HTML source, not text.
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)


def tidy_text(text: str) -> str:
    """Strip trailing spaces on each line and squeeze runs of blank lines to one."""
    lines = [line.rstrip() for line in text.split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return tidy_text("".join(parser.parts))


def read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


class ManRenderError(Exception):
    """A man page that groff failed to render or that ran past MAN_TIMEOUT_S."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _run_filter(cmd: list[str], data: bytes, path: Path) -> bytes:
    # coreutils `timeout` kills the filter itself, and the subprocess timeout is a backstop if `timeout` hangs.
    proc = subprocess.run(
        ["timeout", str(MAN_TIMEOUT_S), *cmd],
        check=False,
        input=data,
        capture_output=True,
        timeout=MAN_TIMEOUT_S + 5,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
    )
    if proc.returncode == 124:
        raise ManRenderError(path, "timeout")
    if proc.returncode != 0:
        raise ManRenderError(path, f"{cmd[0]} exit {proc.returncode}")
    return proc.stdout


def render_man_page(path: Path, source: bytes) -> str:
    """Render troff `source` to plain UTF-8 text.

    Raises:
        ManRenderError: groff failed, timed out, or produced no text.
    """
    # preconv turns UTF-8 input into groff escapes, and -P-cbou makes grotty print plain characters without overstrikes.
    utf8 = _run_filter(["preconv", "-e", "UTF-8"], source, path)
    rendered = _run_filter(["groff", "-t", "-mandoc", "-Tutf8", "-P-cbou"], utf8, path)
    text = tidy_text(rendered.decode("utf-8", errors="replace"))
    if len(text.strip()) == 0:
        raise ManRenderError(path, "empty output")
    return text
