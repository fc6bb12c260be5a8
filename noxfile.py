"""Development and CI sessions for the DETR-iRPE monorepo.

Run ``nox -l`` for the list. The two commands of the README:

* ``nox -s demo``  — train and evaluate a small DETR-iRPE on the built-in synthetic dataset;
* ``nox -t ci``    — everything CI runs: lint, the release wheels and their index (the CUDA
  wheel's device code is checked), installs by name from that index, each package's tests,
  the irpe-ops torch/CUDA matrix, the cross-package tests, docs, the short demo.

Sessions use uv virtual environments. uv links packages out of one shared cache, so the 5.5 GB
CUDA build of torch is unpacked once per machine instead of once per session (pip takes
90-110 s and 5.5 GB for each new venv here; uv under a second once cached).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "tests", "cross"]

ROOT = Path(__file__).resolve().parent
PACKAGES = ("irpe-ops", "irpe-nn", "detr-irpe")
DIST = ROOT / "dist"

# The torch releases irpe-ops supports; the default one is the CUDA 13 build that also runs on CPU.
TORCH = {
    "2.14.1": ("torch==2.14.1", "torchvision==0.29.1"),
    "2.13.0": ("torch==2.13.0",),
}
DEFAULT_TORCH = "2.14.1"
# The irpe-ops wheels of a release that one Linux x86_64 machine builds, as (torch,
# IRPE_WITH_CUDA); the CUDA one needs nvcc. The full matrix (every Python) is in
# .github/workflows/wheels.yml.
WHEEL_MATRIX = (("2.13.0", "OFF"), ("2.14.1", "OFF"), ("2.14.1", "ON"))
WHEELHOUSE = DIST / "wheelhouse"  # the release files; dist/simple indexes them
BUILD_TOOLS = ("scikit-build-core>=0.10", "pybind11>=2.12", "build", "cmake>=3.26", "ninja")
TEST_TOOLS = ("pytest>=8", "numpy")


def _configure_uv_from_pip() -> None:
    """Point uv at the package folders pip is configured with.

    uv does not read pip's configuration; on machines whose pip looks at local wheel folders
    (as ours do for torch), uv would otherwise download several GB of CUDA wheels instead.
    Settings already present in the environment win.
    """
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    extra_index = settings.get("extra-index-url", "")
    find_links = os.environ.get("PIP_FIND_LINKS") or settings.get("find-links", "")
    if extra_index:
        os.environ.setdefault("UV_EXTRA_INDEX_URL", extra_index)
    if find_links:
        os.environ.setdefault("UV_FIND_LINKS", find_links)
    if extra_index or find_links:
        # torch and its CUDA libraries live in different local folders; pick the best match
        # across all of them rather than the first index that knows the name.
        os.environ.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")


_configure_uv_from_pip()


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") or shutil.which(str(Path(cuda_home) / "bin" / "nvcc"))


def _source_digest(package: str) -> str:
    """A digest of a package's sources, so that a cached wheel is rebuilt when they change."""
    digest = hashlib.sha256()
    base = ROOT / "packages" / package
    # Only what goes into the wheel: test runs leave caches (.pytest_cache, __pycache__) in the
    # package folder, and hashing those would force a full (CUDA) rebuild in every session.
    inputs = [base / "pyproject.toml", base / "CMakeLists.txt", base / "README.md"]
    for folder in ("csrc", "cmake", "src"):
        inputs += (base / folder).rglob("*")
    for path in sorted(inputs):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(base)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ops_wheel(session: nox.Session, torch_version: str, cuda: str) -> Path:
    """Build the irpe-ops wheel for ``torch_version`` once and reuse it in later sessions.

    ``cuda`` is the ``IRPE_WITH_CUDA`` setting (``ON``, ``OFF`` or ``AUTO``). The wheel is built
    without build isolation against the torch installed in ``session``, so compiled code and
    runtime torch always match.
    """
    out = DIST / "irpe-ops" / f"torch{torch_version}-cuda{cuda.lower()}"
    stamp = out / "SOURCES"
    wheels = sorted(out.glob("irpe_ops-*.whl"))
    digest = _source_digest("irpe-ops")
    if wheels and stamp.exists() and stamp.read_text() == digest:
        session.log(f"reusing {wheels[-1].relative_to(ROOT)}")
        return wheels[-1]
    shutil.rmtree(out, ignore_errors=True)
    session.install(*BUILD_TOOLS)
    session.run(
        "python",
        "-m",
        "build",
        "--wheel",
        "--no-isolation",
        "--outdir",
        str(out),
        str(ROOT / "packages" / "irpe-ops"),
        env={
            "IRPE_WITH_CUDA": cuda,
            "IRPE_LOCAL_VERSION": "1",  # 0.1.0+pt214cu130: one wheel per torch x CUDA variant
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        },
    )
    stamp.write_text(digest)
    return sorted(out.glob("irpe_ops-*.whl"))[-1]


def default_cuda_setting() -> str:
    """CUDA kernels whenever this machine can compile them."""
    return "ON" if _nvcc() else "OFF"


def install_stack(session: nox.Session, *, ops: bool = True, detr: bool = True) -> None:
    """Install torch, irpe-ops (from its cached wheel), irpe-nn and detr-irpe, plus test tools."""
    session.install(*TORCH[DEFAULT_TORCH], *TEST_TOOLS)
    packages: list[str] = []
    if ops:
        packages.append(str(ops_wheel(session, DEFAULT_TORCH, default_cuda_setting())))
    packages.append(str(ROOT / "packages" / "irpe-nn") + ("[plot]" if detr else ""))
    if detr:
        # The trackers are optional extras; installed here so that their tests run in CI.
        packages.append(str(ROOT / "packages" / "detr-irpe") + "[export,mlflow,wandb]")
    session.install(*packages)


@nox.session(venv_backend="none")
def dev(session: nox.Session) -> None:
    """Create .venv at the repository root: all three packages editable plus the tools."""
    venv = ROOT / ".venv"
    env = {"VIRTUAL_ENV": str(venv)}
    if not (venv / "bin" / "python").exists():
        session.run("uv", "venv", "--python", sys.executable, str(venv), external=True)
    session.run(
        "uv", "pip", "install", *TORCH[DEFAULT_TORCH], *BUILD_TOOLS, *TEST_TOOLS,
        "ruff", "mkdocs", "tensorboard", external=True, env=env,
    )  # fmt: skip
    # irpe-ops compiles against the torch in .venv (no build isolation); the pure-Python
    # packages build in isolation (their backend, hatchling, needs `editables` for -e).
    session.run(
        "uv", "pip", "install", "--no-build-isolation", "-e", str(ROOT / "packages" / "irpe-ops"),
        external=True, env={**env, "IRPE_WITH_CUDA": os.environ.get("IRPE_WITH_CUDA", "AUTO")},
    )  # fmt: skip
    session.run(
        "uv", "pip", "install",
        "-e", str(ROOT / "packages" / "irpe-nn") + "[plot]",
        "-e", str(ROOT / "packages" / "detr-irpe") + "[export,mlflow,wandb]",
        external=True, env=env,
    )  # fmt: skip
    session.log(f"activate with: source {venv.relative_to(ROOT)}/bin/activate")


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff check and format check over the whole tree."""
    session.install("ruff==0.17.6")  # pinned: new ruff releases add rules and formatting
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
def wheels(session: nox.Session) -> None:
    """The release files: the irpe-ops wheel matrix, each package's wheel and sdist, indexes.

    Into ``dist/wheelhouse``: one irpe-ops wheel per row of ``WHEEL_MATRIX`` (labelled
    ``+pt214cu130``, pinned to its torch, tagged manylinux by ci/repair_wheel.py; the CUDA one
    checked for device code), the irpe-nn and detr-irpe wheels, and an sdist of each package.
    Then PEP 503 indexes over them: ``dist/simple`` and ``dist/whl/<variant>/simple``.
    """
    session.install("wheel", *BUILD_TOOLS)
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    for torch_version, cuda in WHEEL_MATRIX:
        if cuda == "ON" and not _nvcc():
            session.warn(f"nvcc not found: no CUDA wheel for torch {torch_version}")
            continue
        session.install(TORCH[torch_version][0])
        wheel = ops_wheel(session, torch_version, cuda)
        if cuda == "ON":
            check_device_code(session, wheel)
        session.run(
            "python", str(ROOT / "ci" / "repair_wheel.py"), str(wheel), "--out-dir", str(WHEELHOUSE)
        )
    # The sdist's metadata is computed against the installed torch: no isolated 5 GB build env.
    session.run(
        "python", "-m", "build", "--sdist", "--no-isolation", "--outdir", str(WHEELHOUSE),
        str(ROOT / "packages" / "irpe-ops"),
    )  # fmt: skip
    for package in ("irpe-nn", "detr-irpe"):
        session.run(
            "uv", "build", "--wheel", "--sdist", "--out-dir", str(WHEELHOUSE),
            str(ROOT / "packages" / package), external=True,
        )  # fmt: skip
    session.run(
        "python", str(ROOT / "ci" / "simple_index.py"), str(WHEELHOUSE), "--root", str(DIST)
    )


def check_device_code(session: nox.Session, wheel: Path) -> None:
    """The CUDA wheel holds SASS for the release architectures and PTX for the newest."""
    archs = os.environ.get("IRPE_CHECK_ARCHS", "80,86,89,90")
    session.install("nvidia-cuda-cuobjdump")
    session.run("python", str(ROOT / "ci" / "check_cuda_wheel.py"), str(wheel), "--archs", archs)


@nox.session(tags=["ci"])
@nox.parametrize(
    ("torch_version", "index", "packages"),
    [
        ("2.14.1", "simple", "irpe-ops irpe-nn detr-irpe"),
        ("2.14.1", "whl/cpu/simple", "irpe-ops irpe-nn"),
        ("2.13.0", "simple", "irpe-ops irpe-nn"),
        ("2.14.1", "simple", "irpe-nn"),
    ],
    ids=["torch2.14-all", "torch2.14-cpu-index", "torch2.13", "nn-alone"],
)
def index_install(session: nox.Session, torch_version: str, index: str, packages: str) -> None:
    """A fresh environment with torch installs the packages by name from an index in dist/.

    As docs/install.md tells users: the installed torch is pinned in the same command, so the
    installer picks the irpe-ops wheel built for it instead of changing torch.
    """
    index_dir = DIST / index
    if not (index_dir / "index.html").is_file():
        session.error(f"{index_dir} is missing: run `ci/nox -s wheels` first")
    names = packages.split()
    session.install(*(TORCH[torch_version] if "detr-irpe" in names else TORCH[torch_version][:1]))
    session.install(f"torch=={torch_version}", "--extra-index-url", index_dir.as_uri(), *names)
    if "irpe-ops" not in names:
        variant = ["--no-ops"]
    elif index.startswith("whl/cpu") or torch_version != DEFAULT_TORCH or not _nvcc():
        variant = ["--variant", "cpu"]  # the only build there (torch 2.13: CPU only here)
    else:
        variant = ["--variant", "cu"]  # the CUDA build's label sorts after the CPU one's
    session.run("python", str(ROOT / "ci" / "smoke_installed.py"), *names, *variant)


@nox.session(tags=["ci"])
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests, with the packages it uses installed from wheels."""
    install_stack(session, ops=True, detr=package == "detr-irpe")
    tests_dir = ROOT / "packages" / package / "tests"
    session.run("pytest", str(tests_dir), "-q", *session.posargs)


@nox.session(tags=["ci"])
def nn_without_ops(session: nox.Session) -> None:
    """irpe-nn installed alone: its tests pass on the pure-PyTorch fallback."""
    install_stack(session, ops=False, detr=False)
    session.run(
        "python", "-c",
        "import importlib.util, irpe_nn; "
        "assert importlib.util.find_spec('irpe_ops') is None; "
        "assert irpe_nn.backend() == 'torch', irpe_nn.backend()",
    )  # fmt: skip
    session.run("pytest", str(ROOT / "packages" / "irpe-nn" / "tests"), "-q", *session.posargs)


@nox.session(tags=["ci"])
@nox.parametrize(
    ("torch_version", "cuda"),
    [("2.13.0", "OFF"), ("2.14.1", "OFF")],
    ids=["torch2.13-cpu", "torch2.14-cpu"],
)
def ops_matrix(session: nox.Session, torch_version: str, cuda: str) -> None:
    """irpe-ops built CPU-only against each supported torch (the CUDA build runs in `tests`)."""
    session.install(*TORCH[torch_version], *TEST_TOOLS)
    session.install(str(ops_wheel(session, torch_version, cuda)))
    session.run("python", "-c", "import irpe_ops; assert not irpe_ops.cuda_built()")
    session.run("pytest", str(ROOT / "packages" / "irpe-ops" / "tests"), "-q", *session.posargs)


@nox.session(tags=["ci"])
def cross(session: nox.Session) -> None:
    """Cross-package tests (tests/ at the repository root): the packages used together."""
    install_stack(session, ops=True, detr=True)
    session.run("pytest", str(ROOT / "tests"), "-q", *session.posargs)


@nox.session(tags=["ci"])
def docs(session: nox.Session) -> None:
    """Build the documentation site (MkDocs, strict: broken links fail)."""
    session.install("mkdocs")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "_site"))


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark in benchmarks/ on the CPU (arguments after -- go to every script)."""
    install_stack(session, ops=True, detr=True)
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: synthetic data, train a small DETR-iRPE on the CPU, evaluate, draw, plot.

    ``nox -s demo -- --quick`` runs the short variant CI uses.
    """
    install_stack(session, ops=True, detr=True)
    session.run("detr-irpe-demo", "--output_dir", str(ROOT / "outputs" / "demo"), *session.posargs)


@nox.session(name="demo_quick", tags=["ci"])
def demo_quick(session: nox.Session) -> None:
    """The short demo CI runs: the whole pipeline end to end on a few images."""
    install_stack(session, ops=True, detr=True)
    session.run("detr-irpe-demo", "--quick", "--output_dir", str(ROOT / "outputs" / "demo-quick"))
