"""Write PEP 503 "simple" package indexes over a folder of wheels and sdists.

``dist/simple/`` lists every file: an installer picks the irpe-ops wheel whose ``torch==X.Y.*``
requirement the torch being installed satisfies, and among the torch 2.14 builds the CUDA one
(its ``+pt214cu130`` label sorts after ``+pt214cpu``). As torch does for its own CPU and CUDA
builds, one index per variant, ``dist/whl/<variant>/simple/`` (``cpu``, ``cu130``), lists only
that variant's irpe-ops wheels, for a CPU-only torch in particular.

Links are relative (the indexes work from a file:// URL or any static web server) and carry the
file's sha256 and ``data-requires-python`` as installers expect.

    python ci/simple_index.py dist/wheelhouse --root dist
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import html
import os
import re
import tarfile
import urllib.parse
import zipfile
from collections import defaultdict
from pathlib import Path

_VARIANT = re.compile(r"\+pt\d+(?P<variant>cpu|cu\d+)-")


def normalize(name: str) -> str:
    """PEP 503 project name normalisation: ``irpe_ops`` -> ``irpe-ops``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_metadata(path: Path) -> email.message.Message:
    """The core metadata (``METADATA`` of a wheel, ``PKG-INFO`` of an sdist)."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            text = archive.read(name).decode()
    else:
        with tarfile.open(path) as archive:
            member = next(
                m
                for m in archive.getmembers()
                if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")
            )
            extracted = archive.extractfile(member)
            assert extracted is not None
            text = extracted.read().decode()
    return email.parser.Parser().parsestr(text, headersonly=True)


def _anchor(path: Path, page_dir: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    href = urllib.parse.quote(os.path.relpath(path, page_dir))  # the + of a local version
    requires = read_metadata(path).get("Requires-Python")
    attribute = f' data-requires-python="{html.escape(requires)}"' if requires else ""
    return f'<a href="{html.escape(href)}#sha256={digest}"{attribute}>{html.escape(path.name)}</a>'


def write_index(files: list[Path], index_dir: Path) -> None:
    """``index_dir/index.html`` listing the projects, and one page per project."""
    projects: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        projects[normalize(read_metadata(path)["Name"])].append(path)
    index_dir.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="{name}/">{name}</a><br>\n' for name in sorted(projects))
    (index_dir / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    for name, paths in projects.items():
        page_dir = index_dir / name
        page_dir.mkdir(exist_ok=True)
        anchors = "".join(_anchor(p, page_dir) + "<br>\n" for p in sorted(paths))
        (page_dir / "index.html").write_text(
            f"<!DOCTYPE html>\n<html><body>\n<h1>Links for {name}</h1>\n{anchors}</body></html>\n"
        )


def variant_of(path: Path) -> str | None:
    """``"cpu"`` or ``"cu130"`` for a labelled irpe-ops wheel, ``None`` for any other file."""
    match = _VARIANT.search(path.name)
    return match.group("variant") if match else None


def write_indexes(wheelhouse: Path, root: Path) -> list[Path]:
    """The full index at ``root/simple`` and one per variant; returns the index folders."""
    files = sorted(p for p in wheelhouse.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    if not files:
        raise SystemExit(f"simple_index: no wheels or sdists in {wheelhouse}")
    written = [root / "simple"]
    write_index(files, written[0])
    for variant in sorted({v for v in map(variant_of, files) if v}):
        index = root / "whl" / variant / "simple"
        write_index([p for p in files if variant_of(p) in (None, variant)], index)
        written.append(index)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheelhouse", type=Path, help="folder holding the wheels and sdists")
    parser.add_argument("--root", type=Path, required=True, help="where simple/ and whl/ go")
    args = parser.parse_args(argv)
    for index in write_indexes(args.wheelhouse, args.root):
        print(f"simple_index: wrote {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
