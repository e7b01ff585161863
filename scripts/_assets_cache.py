"""Cache primitives for fetch_assets.py: pinned downloads, atomic publishing and build stamps.

Every output is built in a temporary sibling and moved into place with os.replace, so a killed
run leaves either the previous complete output or nothing. Each output directory carries a
BUILD.json stamp, written before the move; a directory with a matching stamp is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "STAMP_NAME",
    "apt_download",
    "atomic_write_bytes",
    "deb_version",
    "make_public",
    "pip_download_wheel",
    "publish_dir",
    "pypi_download_sdist",
    "read_stamp",
    "remove_stale_temporaries",
    "sha256_file",
    "staging_dir",
]

logger = logging.getLogger("fetch_assets")

STAMP_NAME = "BUILD.json"
# pip reads the same variable, so a mirror configured for pip is used here too.
PYPI_SIMPLE_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
HTTP_TIMEOUT_S = 120
HTTP_ATTEMPTS = 3


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: Path) -> None:
    """Give a mkstemp/mkdtemp path (mode 0600/0700) the permissions a plain create would have."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_current_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        make_public(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the hidden `.*.tmp` and `.*.old` entries that a killed run leaves in `directory`.

    NOTE: this also deletes the work of a concurrent run on the same cache, which is not supported.
    """
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
            logger.info("removing %s, left by an interrupted run", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def read_stamp(directory: Path) -> dict | None:
    """Return the BUILD.json of a published directory, or None if it is missing or unreadable."""
    try:
        return json.loads((directory / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def staging_dir(final: Path) -> Path:
    """Create an empty directory next to `final` to build it in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    make_public(staged)
    return staged


def publish_dir(staged: Path, final: Path, stamp: dict | None) -> None:
    """Write the stamp into `staged`, then move it to `final`, replacing an older build.

    With `stamp=None` the caller has already written its own completion record into `staged`.
    """
    if stamp is not None:
        (staged / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # os.replace cannot overwrite a non-empty directory, so the old build is moved aside first.
    # A kill between the two renames leaves no `final`, which the next run rebuilds.
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
        os.replace(final, old / final.name)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)


def _http_get(url: str) -> urllib.request.addinfourl:
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except (urllib.error.URLError, TimeoutError) as err:
            if attempt == HTTP_ATTEMPTS:
                raise
            logger.warning("GET %s failed (%s), retry %d/%d", url, err, attempt, HTTP_ATTEMPTS - 1)
            time.sleep(2 * attempt)
    raise AssertionError("unreachable")


def pypi_download_sdist(name: str, version: str, sha256: str, dest_dir: Path) -> Path:
    """Download the source distribution of `name==version` from the PyPI simple index (PEP 691 JSON).

    NOTE: `pip download --no-binary :all:` would also run the sdist's build backend to read its
    metadata. For llama-cpp-python that compiles CMake from source first (over 15 minutes on 2 cores),
    so the archive is fetched from the same index pip uses and checked against a pinned SHA-256.
    """
    normalized = name.lower().replace("_", "-").replace(".", "-")
    index_url = f"{PYPI_SIMPLE_URL}/{normalized}/"
    try:
        with _http_get(index_url) as response:
            files = json.load(response)["files"]
    except (urllib.error.URLError, TimeoutError, ValueError, KeyError) as err:
        raise RuntimeError(f"failed to read the PyPI index page {index_url} for {name}=={version}: {err}") from err

    stem = f"{name.replace('-', '_')}-{version}"
    sdists = [f for f in files if f["filename"] in (f"{stem}.tar.gz", f"{name}-{version}.tar.gz")]
    if not sdists:
        raise RuntimeError(f"no source distribution of {name}=={version} found on {index_url}")
    entry = sdists[0]
    if entry.get("hashes", {}).get("sha256", sha256) != sha256:
        raise RuntimeError(
            f"{entry['filename']} on {index_url} has sha256 {entry['hashes']['sha256']}, expected the pinned {sha256}"
        )

    dest = dest_dir / entry["filename"]
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest

    logger.info("downloading %s (%.1f MB)", entry["filename"], entry.get("size", 0) / 1e6)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{entry['filename']}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, _http_get(entry["url"]) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = sha256_file(Path(tmp))
        if actual != sha256:
            raise RuntimeError(f"downloaded {entry['filename']} has sha256 {actual}, expected the pinned {sha256}")
        make_public(Path(tmp))
        os.replace(tmp, dest)
    except (urllib.error.URLError, TimeoutError) as err:
        raise RuntimeError(f"failed to download {entry['url']} ({name}=={version}): {err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def pip_download_wheel(name: str, version: str, filename: str, sha256: str, dest_dir: Path) -> Path:
    """Download one pinned wheel with `pip download --no-deps` and check its SHA-256."""
    dest = dest_dir / filename
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest

    logger.info("pip download %s==%s", name, version)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-", suffix=".tmp") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "--dest", tmp, f"{name}=={version}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download {name}=={version} failed (exit {proc.returncode}); "
                f"check network access to PyPI.\n{proc.stderr.strip()[-2000:]}"
            )
        got = Path(tmp) / filename
        if not got.is_file():
            raise RuntimeError(f"pip download {name}=={version} did not produce {filename}: {os.listdir(tmp)}")
        actual = sha256_file(got)
        if actual != sha256:
            raise RuntimeError(f"downloaded {filename} has sha256 {actual}, expected the pinned {sha256}")
        os.replace(got, dest)
    return dest


def apt_download(package: str, dest_dir: Path) -> Path:
    """Return the cached .deb of `package`, downloading the apt candidate version if none is cached.

    NOTE: the version is whatever the configured Debian suite serves on the first run, because
    Debian removes superseded point-release and security versions from its mirrors. The cached
    .deb pins it from then on, and SOURCES.json records it.
    """
    cached = sorted(dest_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]

    logger.info("apt-get download %s", package)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".apt-", suffix=".tmp") as tmp:
        proc = subprocess.run(["apt-get", "download", package], check=False, cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise RuntimeError(
                f"apt-get download {package} failed (exit {proc.returncode}); run `apt-get update` and check that "
                f"the Debian bookworm main repository is configured.\n{proc.stderr.strip()[-2000:]}"
            )
        dest = dest_dir / debs[0].name
        os.replace(debs[0], dest)
    return dest


def deb_version(deb: Path) -> str:
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()
