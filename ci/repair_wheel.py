"""Give an irpe-ops wheel the lowest ``manylinux`` platform tag its binary satisfies.

A wheel tagged ``linux_x86_64`` cannot be uploaded to an index, and installers only trust a
``manylinux_2_X`` tag (PEP 600): the binary needs at most glibc 2.X and links only libraries
every such Linux has, or libraries that are already there by other means. ``auditwheel repair``
is the usual tool; it is not on this machine's package registry, so this script does the part
irpe-ops needs, with binutils' ``readelf``:

* every shared library the extension needs is either in the manylinux policy (glibc,
  libstdc++, libgcc_s, ...) or provided by torch, which is loaded before the extension:
  ``libtorch*``, ``libc10*``, torch's own ``libgomp.so.1`` and the CUDA runtime of torch's
  CUDA build. Nothing is grafted into the wheel: a second copy of those would be a second
  OpenMP runtime or CUDA runtime in the process;
* the glibc symbol versions it needs give the tag (``manylinux_2_28`` at least, the oldest
  base that torch's own wheels use); libstdc++ and libgcc symbol versions must fit the oldest
  of those systems (gcc 8);
* ``wheel tags`` rewrites the tag.

The release workflow (.github/workflows/wheels.yml) builds in a manylinux_2_28 image and runs
``auditwheel show`` on the result as an independent check.

    python ci/repair_wheel.py WHEEL --out-dir DIR
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

# The libraries a manylinux system provides (PEP 600 / auditwheel's policy for x86_64).
SYSTEM_LIBRARIES = frozenset(
    {
        "ld-linux-x86-64.so.2",
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "librt.so.1",
        "libpthread.so.0",
        "libutil.so.1",
        "libresolv.so.2",
        "libnsl.so.1",
        "libstdc++.so.6",
        "libgcc_s.so.1",
    }
)
# Loaded by `import torch` before irpe_ops._C, and found again by soname.
TORCH_LIBRARIES = re.compile(r"^(libtorch[\w-]*|libc10[\w-]*)\.so$|^libgomp\.so\.1$|^libcudart\.so")
# The newest libstdc++/libgcc symbol versions of the oldest manylinux_2_28 system (gcc 8).
MAX_TOOLCHAIN_VERSIONS = {"GLIBCXX": (3, 4, 25), "CXXABI": (1, 3, 11), "GCC": (8, 0, 0)}
OLDEST_GLIBC_MINOR = 28


class RepairError(Exception):
    """The wheel cannot get a manylinux tag; the message says why."""


def needed_versions(library: Path) -> dict[str, set[str]]:
    """``{needed library: {symbol versions}}`` from the ELF's dynamic section and version needs."""
    dynamic = subprocess.run(
        ["readelf", "--dynamic", "--wide", str(library)], capture_output=True, text=True, check=True
    ).stdout
    needs: dict[str, set[str]] = defaultdict(set)
    for name in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic):
        needs[name]
    versions = subprocess.run(
        ["readelf", "--version-info", "--wide", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    current = None
    for line in versions.splitlines():
        if match := re.search(r"File: (\S+)", line):
            current = match.group(1)
        elif (match := re.search(r"Name: (\S+)", line)) and current is not None:
            needs[current].add(match.group(1))
    return dict(needs)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _newer_than_gcc8(family: str, number: str) -> bool:
    """Whether a libstdc++/libgcc symbol version (``GLIBCXX``, ``3.4.30``) is past gcc 8's."""
    limit = MAX_TOOLCHAIN_VERSIONS.get(family)
    return limit is not None and number[:1].isdigit() and _version_tuple(number) > limit


def platform_tag(needs: dict[str, set[str]], arch: str = "x86_64") -> str:
    """The manylinux tag these needs satisfy; raises :class:`RepairError` if none does."""
    foreign = sorted(n for n in needs if n not in SYSTEM_LIBRARIES and not TORCH_LIBRARIES.match(n))
    if foreign:
        raise RepairError(
            f"links {', '.join(foreign)}: neither a manylinux system library nor torch's"
        )
    glibc_minor = OLDEST_GLIBC_MINOR
    for library, versions in needs.items():
        if TORCH_LIBRARIES.match(library):
            continue  # torch's libraries come with torch's wheel, whatever their versions
        for version in versions:
            family, _, number = version.partition("_")
            if family == "GLIBC":
                glibc_minor = max(glibc_minor, _version_tuple(number)[1])
            elif _newer_than_gcc8(family, number):
                raise RepairError(f"needs {version} from {library}, newer than gcc 8 provides")
    return f"manylinux_2_{glibc_minor}_{arch}"


def repair(wheel: Path, out_dir: Path) -> Path:
    """Write ``wheel`` retagged ``manylinux_2_X`` into ``out_dir``; returns the new path."""
    with tempfile.TemporaryDirectory(prefix="repair_wheel_") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so")]
            if not libraries:
                raise RepairError(f"{wheel.name}: no compiled library inside; nothing to repair")
            archive.extractall(tmp, members=libraries)
        tags = {platform_tag(needed_versions(Path(tmp) / name)) for name in libraries}
    tag = max(tags, key=lambda t: int(t.split("_")[2]))  # the most demanding library decides
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / wheel.name
    shutil.copy2(wheel, staged)
    renamed = subprocess.run(
        [sys.executable, "-m", "wheel", "tags", "--remove", "--platform-tag", tag, str(staged)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]  # `wheel tags` prints the new file name
    return out_dir / renamed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path, nargs="+", help="linux_x86_64 wheels to retag")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the tagged wheels")
    args = parser.parse_args(argv)
    for wheel in args.wheels:
        try:
            repaired = repair(wheel, args.out_dir)
        except RepairError as err:
            print(f"repair_wheel: {wheel.name}: {err}", file=sys.stderr)
            return 1
        print(f"{wheel.name} -> {repaired.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
