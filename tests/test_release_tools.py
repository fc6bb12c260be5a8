"""The release scripts in ci/: manylinux tagging, the PEP 503 indexes, the release workflow."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import urllib.parse
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "ci" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


repair_wheel = _script("repair_wheel")
simple_index = _script("simple_index")

_TORCH_NEEDS = {"libc10.so": set(), "libtorch_cpu.so": set(), "libgomp.so.1": {"GOMP_4.0"}}


def test_the_newest_glibc_symbol_decides_the_manylinux_tag() -> None:
    needs = {
        **_TORCH_NEEDS,
        "libc.so.6": {"GLIBC_2.2.5", "GLIBC_2.32"},
        "libm.so.6": {"GLIBC_2.29"},
    }
    assert repair_wheel.platform_tag(needs) == "manylinux_2_32_x86_64"


def test_an_old_glibc_still_gets_manylinux_2_28() -> None:
    needs = {"libc.so.6": {"GLIBC_2.2.5", "GLIBC_2.17"}, "libstdc++.so.6": {"GLIBCXX_3.4.21"}}
    assert repair_wheel.platform_tag(needs) == "manylinux_2_28_x86_64"


def test_a_library_that_neither_the_system_nor_torch_provides_is_refused() -> None:
    needs = {"libc.so.6": {"GLIBC_2.17"}, "libopencv_core.so.406": set()}
    with pytest.raises(repair_wheel.RepairError, match=re.escape("links libopencv_core.so.406")):
        repair_wheel.platform_tag(needs)


def test_a_libstdcxx_newer_than_the_oldest_manylinux_2_28_is_refused() -> None:
    needs = {"libstdc++.so.6": {"GLIBCXX_3.4.30"}}
    with pytest.raises(repair_wheel.RepairError, match=re.escape("GLIBCXX_3.4.30 from libstdc")):
        repair_wheel.platform_tag(needs)


def test_the_needs_of_the_built_extension_are_read() -> None:
    irpe_ops = pytest.importorskip("irpe_ops")
    if shutil.which("readelf") is None:
        pytest.skip("binutils' readelf is not installed")
    library = Path(irpe_ops._C.__file__)
    needs = repair_wheel.needed_versions(library)
    assert "libc.so.6" in needs and "libtorch_cpu.so" in needs
    assert any(v.startswith("GLIBC_2.") for v in needs["libc.so.6"])
    assert repair_wheel.platform_tag(needs).startswith("manylinux_2_")


def _fake_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any") -> Path:
    distribution = name.replace("-", "_")
    path = folder / f"{distribution}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            f"{distribution}-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nRequires-Python: >=3.10\n",
        )
    return path


def test_the_indexes_list_every_file_with_its_digest_and_one_variant_each(tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    cpu = _fake_wheel(house, "irpe-ops", "0.1.0+pt214cpu", "cp311-cp311-manylinux_2_32_x86_64")
    cuda = _fake_wheel(house, "irpe-ops", "0.1.0+pt214cu130", "cp311-cp311-manylinux_2_32_x86_64")
    layers = _fake_wheel(house, "irpe_nn", "0.1.0")
    written = simple_index.write_indexes(house, tmp_path)
    assert written == [
        tmp_path / "simple",
        tmp_path / "whl" / "cpu" / "simple",
        tmp_path / "whl" / "cu130" / "simple",
    ]
    projects = (tmp_path / "simple" / "index.html").read_text()
    assert 'href="irpe-nn/"' in projects and 'href="irpe-ops/"' in projects
    page = (tmp_path / "simple" / "irpe-ops" / "index.html").read_text()
    digest = hashlib.sha256(cpu.read_bytes()).hexdigest()
    quoted = cpu.name.replace("+", "%2B")  # a local version's + is quoted in the URL
    assert f'href="../../wheelhouse/{quoted}#sha256={digest}"' in page
    assert cuda.name in page and 'data-requires-python="&gt;=3.10"' in page
    cpu_page = (tmp_path / "whl" / "cpu" / "simple" / "irpe-ops" / "index.html").read_text()
    assert cpu.name in cpu_page and cuda.name not in cpu_page
    links = re.findall(r'href="([^"#]+)', cpu_page)
    target = tmp_path / "whl" / "cpu" / "simple" / "irpe-ops" / urllib.parse.unquote(links[0])
    assert target.resolve() == cpu.resolve()
    assert (
        layers.name in (tmp_path / "whl" / "cpu" / "simple" / "irpe-nn" / "index.html").read_text()
    )


def test_an_empty_wheelhouse_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no wheels or sdists"):
        simple_index.write_indexes(tmp_path, tmp_path)


def test_the_release_workflow_builds_the_whole_matrix_with_the_repository_scripts() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "wheels.yml").read_text())
    matrix = workflow["jobs"]["irpe-ops"]["strategy"]["matrix"]
    assert matrix["python"] == ["3.10", "3.11", "3.12", "3.13"]
    assert set(matrix["torch"]) == {"2.13.0", "2.14.1"} and set(matrix["variant"]) == {
        "cpu",
        "cuda",
    }
    combos = {(row["torch"], row["variant"]) for row in matrix["include"]}
    assert combos == {(t, v) for t in matrix["torch"] for v in matrix["variant"]}
    text = (ROOT / ".github" / "workflows" / "wheels.yml").read_text()
    for script in set(re.findall(r"ci/[\w/]+\.py", text)):
        assert (ROOT / script).is_file(), f"the workflow runs {script}, which does not exist"
