"""Build the real English + Chinese corpus from Debian documentation packages.

Each source becomes one output in a different input format that cptstream reads, so one build
exercises every reader: JSONL plain, gzip and zstd, a directory of .txt files, and Parquet.
A document is one whole page or file. Every source gets a share of the --corpus-mb budget
and takes documents in a fixed pseudo-random order (SHA-1 of the document path) while they fit,
so a small budget still samples the whole manual. Output rows are sorted by path.
Chinese sources are built first and English is capped so Chinese stays at least ZH_MIN_SHARE of
the text bytes. Output bytes depend only on the .deb files and the versions of zstandard and
pyarrow: gzip headers carry mtime 0 and zstd runs single-threaded at a fixed level.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _assets_cache import apt_download, atomic_write_bytes, deb_version, make_public
from _assets_text import ManRenderError, html_to_text, read_maybe_gzip, render_man_page, tidy_text

__all__ = ["CORPUS_RECIPE", "SOURCES", "ZH_MIN_SHARE", "build_corpus"]

logger = logging.getLogger("fetch_assets")

# Bump when the extraction or the output layout changes, so cached corpora are rebuilt.
CORPUS_RECIPE = 1
ZH_MIN_SHARE = 0.15
MIN_DOC_CHARS = 200
ZSTD_LEVEL = 10
GZIP_LEVEL = 6
MAN_RENDER_THREADS = 2
LINUX_DOC = "usr/share/doc/linux-doc-6.1/Documentation"


@dataclass(frozen=True)
class Document:
    key: str
    """Path relative to the package's documentation root; sorts and names the document."""
    load: Callable[[], str | None]
    """Returns the plain text, or None if the document cannot be converted."""


@dataclass(frozen=True)
class Source:
    name: str
    """Output file or directory name under corpus/."""
    package: str
    language: str
    share: float
    """Fraction of the --corpus-mb budget."""
    collect: Callable[[Path, dict], list[Document]]
    """Lists the documents in the extracted package tree; may record counts in the dict (SOURCES.json "notes")."""


def _html_docs(root: Path, pattern: str, exclude: Callable[[Path], bool] = lambda p: False) -> list[Document]:
    def load(path: Path) -> str:
        return html_to_text(path.read_bytes().decode("utf-8", errors="replace"))

    paths = sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink() and not exclude(p))
    return [Document(str(p.relative_to(root)), lambda p=p: load(p)) for p in paths]


def _plain_docs(root: Path, exclude_dir: str | None = None) -> list[Document]:
    """List reStructuredText and text files (optionally gzipped) under `root`."""
    docs = []
    for path in sorted(root.rglob("*")):
        name = path.name.removesuffix(".gz")
        if not path.is_file() or path.is_symlink() or not name.endswith((".rst", ".txt")):
            continue
        rel = path.relative_to(root)
        if exclude_dir is not None and rel.parts[0] == exclude_dir:
            continue

        def load(path: Path = path) -> str:
            return tidy_text(read_maybe_gzip(path).decode("utf-8", errors="replace"))

        docs.append(Document(str(rel.with_name(name)), load))
    return docs


def _python_docs(root: Path, notes: dict) -> list[Document]:
    html = root / "usr/share/doc/python3.11/html"

    # Index pages hold only link lists; _static and _sources hold assets and reST copies of the pages.
    def exclude(p: Path) -> bool:
        rel = p.relative_to(html)
        return rel.parts[0].startswith("_") or rel.name.startswith("genindex") or rel.name in ("search.html",)

    return _html_docs(html, "**/*.html", exclude)


def _postgres_docs(root: Path, notes: dict) -> list[Document]:
    return _html_docs(root / "usr/share/doc/postgresql-doc-15/html", "*.html")


def _linux_docs_en(root: Path, notes: dict) -> list[Document]:
    return _plain_docs(root / LINUX_DOC, exclude_dir="translations")


def _linux_docs_zh(root: Path, notes: dict) -> list[Document]:
    return _plain_docs(root / LINUX_DOC / "translations/zh_CN")


def _debian_reference_zh(root: Path, notes: dict) -> list[Document]:
    return _html_docs(root / "usr/share/debian-reference", "*.zh-cn.html")


def _manpages_zh(root: Path, notes: dict) -> list[Document]:
    man_root = root / "usr/share/man/zh_CN"
    pages, aliases = [], 0
    for path in sorted(man_root.glob("man*/*.gz")):
        if path.is_symlink():
            aliases += 1
            continue
        source = read_maybe_gzip(path)
        # A `.so` page only points at another page, which is rendered under its own name.
        if source.lstrip().startswith(b".so "):
            aliases += 1
            continue
        pages.append((path, source))

    def render(item: tuple[Path, bytes]) -> str | ManRenderError:
        try:
            return render_man_page(*item)
        except ManRenderError as err:
            return err

    # Rendering is the slow step (about 0.15 s per page), so pages are rendered up front on a few threads.
    logger.info("rendering %d Chinese man pages", len(pages))
    with ThreadPoolExecutor(max_workers=MAN_RENDER_THREADS) as pool:
        results = list(pool.map(render, pages))

    failed: dict[str, int] = {}
    for err in results:
        if isinstance(err, ManRenderError):
            failed[err.reason] = failed.get(err.reason, 0) + 1
            logger.warning("skipped man page %s", err)
    notes.update(
        rendered=len(pages) - sum(failed.values()), aliases_skipped=aliases, failed=dict(sorted(failed.items()))
    )
    logger.info("man pages: %(rendered)d rendered, %(failed)s failed, %(aliases_skipped)d aliases skipped", notes)
    docs = []
    for (path, _), result in zip(pages, results):
        text = None if isinstance(result, ManRenderError) else result
        docs.append(Document(str(path.relative_to(man_root).with_suffix("")), lambda text=text: text))
    return docs


# Chinese sources come first because the English budget depends on how much Chinese text exists.
SOURCES = (
    Source("zh-manpages.parquet", "manpages-zh", "zh", 0.15, _manpages_zh),
    Source("zh-debian-reference.jsonl", "debian-reference-zh-cn", "zh", 0.05, _debian_reference_zh),
    Source("zh-linux-docs", "linux-doc-6.1", "zh", 0.05, _linux_docs_zh),
    Source("en-python-docs.jsonl.zst", "python3.11-doc", "en", 0.25, _python_docs),
    Source("en-postgres-docs.jsonl.gz", "postgresql-doc-15", "en", 0.20, _postgres_docs),
    Source("en-linux-docs.jsonl", "linux-doc-6.1", "en", 0.30, _linux_docs_en),
)


def _select(docs: list[Document], budget: int) -> list[tuple[str, str]]:
    """Take documents in SHA-1 order of their keys while they fit in `budget` UTF-8 bytes."""
    order = sorted(docs, key=lambda d: hashlib.sha1(d.key.encode()).hexdigest())
    selected, used = [], 0
    for doc in order:
        # Stop scanning once the budget is 99% full, because each further page only costs conversion time.
        if used >= 0.99 * budget:
            break
        text = doc.load()
        if text is None or len(text) < MIN_DOC_CHARS:
            continue
        size = len(text.encode("utf-8"))
        if used + size > budget:
            continue
        selected.append((doc.key, text))
        used += size
    return sorted(selected)


def _jsonl_bytes(rows: list[tuple[str, str]], package: str) -> bytes:
    lines = [json.dumps({"text": text, "source": f"{package}:{key}"}, ensure_ascii=False) for key, text in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _write_output(path: Path, rows: list[tuple[str, str]], package: str) -> None:
    """Write rows in the format given by the file name's suffix. A name without a suffix becomes a directory of .txt files."""
    name = path.name
    if name.endswith(".jsonl.zst"):
        import zstandard

        atomic_write_bytes(
            path, zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).compress(_jsonl_bytes(rows, package))
        )
    elif name.endswith(".jsonl.gz"):
        atomic_write_bytes(path, gzip.compress(_jsonl_bytes(rows, package), compresslevel=GZIP_LEVEL, mtime=0))
    elif name.endswith(".jsonl"):
        atomic_write_bytes(path, _jsonl_bytes(rows, package))
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": [t for _, t in rows], "source": [f"{package}:{k}" for k, _ in rows]})
        tmp = path.with_name(f".{name}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        make_public(tmp)
        os.replace(tmp, path)
    else:
        path.mkdir()
        for key, text in rows:
            # One document per file, named after its path with "/" flattened so the directory stays flat.
            stem = key.replace("/", "__").removesuffix(".rst").removesuffix(".txt")
            (path / f"{stem}.txt").write_text(text, encoding="utf-8")


def _output_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def _extract(deb: Path, work: Path) -> Path:
    target = work / deb.stem
    if not target.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target


def build_corpus(staged: Path, debs_dir: Path, corpus_mb: float) -> dict:
    """Write every source into `staged` and return the SOURCES.json record."""
    budget_total = int(corpus_mb * 1_000_000)
    record: dict = {"recipe": CORPUS_RECIPE, "corpus_mb": corpus_mb, "packages": {}, "files": {}}
    zh_bytes = en_bytes = 0
    en_sources = [s for s in SOURCES if s.language == "en"]
    en_share = sum(s.share for s in en_sources)

    # Package trees are large (linux-doc is about 200 MB unpacked), so they live only for this build.
    with tempfile.TemporaryDirectory(dir=staged.parent, prefix=".corpus-work.", suffix=".tmp") as work:
        for source in SOURCES:
            deb = apt_download(source.package, debs_dir)
            record["packages"][source.package] = {"version": deb_version(deb), "deb": deb.name}
            notes: dict = {}
            docs = source.collect(_extract(deb, Path(work)), notes)

            budget = int(source.share * budget_total)
            if source.language == "en":
                # English fills what Chinese left of the total, but no more than ZH_MIN_SHARE allows.
                # The last English source (the largest pool) also takes what earlier ones could not fill.
                en_total = min(budget_total - zh_bytes, int(zh_bytes * (1 - ZH_MIN_SHARE) / ZH_MIN_SHARE))
                budget = int(en_total * source.share / en_share)
                if source is en_sources[-1]:
                    budget = en_total - en_bytes
            rows = _select(docs, budget)

            out = staged / source.name
            _write_output(out, rows, source.package)
            text_bytes = sum(len(t.encode("utf-8")) for _, t in rows)
            if source.language == "zh":
                zh_bytes += text_bytes
            else:
                en_bytes += text_bytes
            record["files"][source.name] = {
                "package": source.package,
                "language": source.language,
                "docs": len(rows),
                "docs_available": len(docs),
                "text_bytes": text_bytes,
                "file_bytes": _output_bytes(out),
            }
            if notes:
                record["files"][source.name]["notes"] = notes
            logger.info("%s: %d of %d docs, %.1f MB text", source.name, len(rows), len(docs), text_bytes / 1e6)

    total = sum(f["text_bytes"] for f in record["files"].values())
    record["totals"] = {
        "docs": sum(f["docs"] for f in record["files"].values()),
        "text_bytes": total,
        "zh_text_bytes": zh_bytes,
        "zh_share": round(zh_bytes / total, 4) if total else 0.0,
    }
    if total and zh_bytes / total < ZH_MIN_SHARE:
        raise RuntimeError(f"corpus is {zh_bytes / total:.1%} Chinese by bytes, below the {ZH_MIN_SHARE:.0%} minimum")
    return record
