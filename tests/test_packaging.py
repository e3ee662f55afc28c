"""Packaging (issue 15 item 7): the wheel's native library is built against Python's stable ABI, so
one file serves every CPython >= 3.10 (checked by loading it from the other interpreters here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OTHER_PYTHONS = ("python3.10", "python3.12", "python3.13")
LIBRARY = "quipsharp/_qskernels.abi3.so"
#: Loads the library as a module (its stub init) and through ctypes, and prints the ISA levels it runs.
PROBE = (
    "import ctypes, importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_qskernels', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "print('LEVELS', ctypes.CDLL(sys.argv[1]).qs_supported_levels())\n"
)


def other_pythons() -> list[Path]:
    """This interpreter and every other CPython >= 3.10 found here (pyenv's installs, real binaries on PATH)."""
    found = {Path(sys.executable)}
    for root in {Path(sys.base_prefix).parent, Path.home() / ".pyenv" / "versions"}:
        found.update(p for p in root.glob("3.*/bin/python3") if p.is_file())
    for name in OTHER_PYTHONS:
        exe = shutil.which(name)
        if exe and ".pyenv/shims" not in exe:  # a pyenv shim refuses versions not selected
            found.add(Path(exe))
    usable = []
    for exe in sorted(found):
        probe = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info >= (3, 10))"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            usable.append(exe)
    return usable


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not sys.platform.startswith("linux"):
        pytest.skip("the native library is built and checked on Linux")
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a clean copy: no build/ leftovers or in-place libraries of the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = list(out.glob("quipsharp-*.whl"))
    return built


def test_wheel_is_tagged_for_the_stable_abi_and_holds_the_package(wheel):
    assert "-cp310-abi3-linux_" in wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert LIBRARY in names
    assert {"quipsharp/lora.py", "quipsharp/export.py", "quipsharp/hf_quantizer.py"} <= names
    assert not any(n.endswith(".so") and n != LIBRARY for n in names)


def test_the_native_library_loads_in_every_python_here(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        library = Path(archive.extract(LIBRARY, tmp_path))
    levels = {}
    for exe in other_pythons():
        result = subprocess.run([str(exe), "-c", PROBE, str(library)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{exe}: {result.stderr[-2000:]}"
        version = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        levels[version] = int(result.stdout.split("LEVELS")[1])
    if len(levels) < 2:
        pytest.skip("no second Python version here to load the library with")
    assert len(set(levels.values())) == 1 and next(iter(levels.values())) > 0
