"""Check that an irpe-ops wheel carries CUDA code for the architectures it should.

Opens the wheel, extracts the compiled extension ``irpe_ops/_C*.so`` and lists its embedded
CUDA binaries with ``cuobjdump --list-elf`` / ``--list-ptx``. Fails unless

* there is SASS (a cubin) for every requested architecture,
* every architecture has the same number of cubins (every ``.cu`` file was built for all), and
* there is PTX for the highest requested architecture (so newer GPUs can JIT-compile it).

When the wheel can be imported here (a matching torch is installed) it also checks that
``irpe_ops.build_info()`` reports CUDA and lists the same architectures.

``cuobjdump`` is looked up on ``PATH``, in ``$CUDA_HOME/bin`` and ``/usr/local/cuda/bin``, and in
the PyPI package ``nvidia-cuda-cuobjdump`` (``pip install nvidia-cuda-cuobjdump``).

Usage::

    python ci/check_cuda_wheel.py dist/irpe_ops-0.1.0-cp311-cp311-linux_x86_64.whl \
        [--archs 80,86,89,90] [--ptx 90]

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

_log = logging.getLogger("check_cuda_wheel")

DEFAULT_ARCHS = "80,86,89,90"
_EXTENSION = re.compile(r"^irpe_ops/_C\.[^/]*\.so$")


class CheckError(Exception):
    """A check failed; the message says which and why."""


def find_cuobjdump() -> Path:
    """Path of a ``cuobjdump`` executable.

    Raises:
        CheckError: none was found.
    """
    found = shutil.which("cuobjdump")
    if found:
        return Path(found)
    candidates = [
        Path(root) / "bin" / "cuobjdump"
        for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
        if root
    ]
    # nvidia-cuda-cuobjdump installs nvidia/cu<major>/bin/cuobjdump (older releases:
    # nvidia/cuda_cuobjdump/bin/cuobjdump) into site-packages.
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            candidates += sorted(nvidia.glob("*/bin/cuobjdump"), reverse=True)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CheckError(
        "cuobjdump not found on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin or in the "
        "nvidia-cuda-cuobjdump package; install it with `pip install nvidia-cuda-cuobjdump`"
    )


def extract_extension(wheel: Path, into: Path) -> Path:
    """Extract the whole wheel into ``into`` and return the path of ``irpe_ops/_C*.so``."""
    if not wheel.is_file():
        raise CheckError(f"{wheel}: no such file")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if _EXTENSION.match(n)]
            if len(names) != 1:
                raise CheckError(
                    f"{wheel}: expected one compiled extension irpe_ops/_C.*.so, found {names}"
                )
            archive.extractall(into)
    except zipfile.BadZipFile as err:
        raise CheckError(f"{wheel}: not a wheel (zip) file: {err}") from err
    return into / names[0]


def list_embedded(cuobjdump: Path, library: Path, what: str) -> list[str]:
    """Architectures (``sm_90``, ...) of the ``--list-elf`` or ``--list-ptx`` entries."""
    result = subprocess.run(
        [str(cuobjdump), f"--list-{what}", str(library)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if "does not contain" in output or not output.strip():
            return []
        raise CheckError(f"cuobjdump --list-{what} {library.name} failed: {output.strip()}")
    return re.findall(r"\.(sm_\d+[af]?)\.(?:cubin|ptx)\b", output)


def check_binaries(elf: list[str], ptx: list[str], archs: list[str], ptx_arch: str) -> None:
    """The SASS/PTX checks; raises :class:`CheckError` listing every problem."""
    problems = []
    cubins = Counter(elf)
    missing = [f"sm_{a}" for a in archs if cubins[f"sm_{a}"] == 0]
    if missing:
        problems.append(f"no SASS for {', '.join(missing)} (found {sorted(cubins) or 'none'})")
    counts = {arch: cubins[f"sm_{arch}"] for arch in archs if cubins[f"sm_{arch}"]}
    if len(set(counts.values())) > 1:
        problems.append(f"architectures have different numbers of cubins: {counts}")
    if f"sm_{ptx_arch}" not in ptx:
        problems.append(f"no PTX for sm_{ptx_arch} (found PTX for {sorted(set(ptx)) or 'none'})")
    if problems:
        raise CheckError("; ".join(problems))


def check_build_info(unpacked: Path, elf: list[str], ptx: list[str]) -> None:
    """Compare ``build_info()`` of the unpacked wheel with what cuobjdump found.

    Skipped (with a message) when the wheel cannot be imported here, for example without a
    matching torch.
    """
    probe = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import irpe_ops; "
        "print(json.dumps(irpe_ops.build_info()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(unpacked)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        _log.info("build_info: skipped, the wheel cannot be imported here (%s)", last)
        return
    info = json.loads(result.stdout.strip().splitlines()[-1])
    _log.info("build_info: %s", info)
    if info.get("cuda_version") is None:
        raise CheckError("build_info() reports no CUDA kernels (cuda_version is None)")
    reported = set(info.get("cuda_archs", []))
    embedded = set(elf) | {arch.replace("sm_", "compute_") for arch in ptx}
    if reported != embedded:
        raise CheckError(
            f"build_info() lists CUDA architectures {sorted(reported)} but the binary holds "
            f"{sorted(embedded)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="the irpe-ops wheel (.whl)")
    parser.add_argument(
        "--archs",
        default=DEFAULT_ARCHS,
        help=f"comma-separated compute capabilities that need SASS (default {DEFAULT_ARCHS})",
    )
    parser.add_argument(
        "--ptx", default=None, help="architecture that needs PTX (default: the highest of --archs)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    archs = [a.strip().replace(".", "") for a in args.archs.split(",") if a.strip()]
    if not archs or not all(re.fullmatch(r"\d+[af]?", a) for a in archs):
        parser.error(f"--archs: expected e.g. 80,86,89,90, got {args.archs!r}")
    ptx_arch = args.ptx or max(archs, key=lambda a: int(re.sub(r"\D", "", a)))

    try:
        cuobjdump = find_cuobjdump()
        with tempfile.TemporaryDirectory(prefix="check_cuda_wheel_") as tmp:
            library = extract_extension(args.wheel, Path(tmp))
            elf = list_embedded(cuobjdump, library, "elf")
            ptx = list_embedded(cuobjdump, library, "ptx")
            _log.info("%s: %s", args.wheel.name, library.name)
            _log.info("  SASS: %s", dict(sorted(Counter(elf).items())) or "none")
            _log.info("  PTX:  %s", dict(sorted(Counter(ptx).items())) or "none")
            check_binaries(elf, ptx, archs, ptx_arch)
            check_build_info(Path(tmp), elf, ptx)
    except CheckError as err:
        _log.error("FAIL: %s", err)
        return 1
    _log.info("OK: SASS for %s and PTX for sm_%s", ", ".join(f"sm_{a}" for a in archs), ptx_arch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
