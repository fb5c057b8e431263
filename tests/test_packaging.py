"""The package layout: folders mapped to import names, none shadowing NVIDIA's `cuda`."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER_TO_IMPORT = {"koifish_app": "koifish_app", "core": "koifish_core", "cuda": "koifish_cuda", "cases": "koifish_cases"}


def test_bare_core_and_cuda_are_not_packages():
    # A cuda/__init__.py would make `import cuda` (done by numba-cuda and CuPy) find this folder.
    assert not (ROOT / "cuda" / "__init__.py").exists()
    assert not (ROOT / "core" / "__init__.py").exists()
    for reserved in ("core.py", "bindings.py", "pathfinder.py"):
        assert not (ROOT / "cuda" / reserved).exists(), f"cuda/{reserved} would join NVIDIA's cuda namespace"


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in FOLDER_TO_IMPORT.items()}
    found = set()
    for folder, name in FOLDER_TO_IMPORT.items():
        base = ROOT / folder
        found.add(name)
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if rel.parts and "__pycache__" not in rel.parts:
                found.add(".".join((name, *rel.parts)))
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"


def test_numba_cuda_imports_from_the_repo_root():
    # Run where a user's shell would be: the checkout on sys.path first.
    code = "import numba.cuda, koifish_core.errors, koifish_cuda, koifish_app.cli; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_every_data_file_is_installed():
    """`pip install .` (not editable) must carry the shipped corpus, the cases and the styles."""
    import fnmatch

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]
    missing = []
    for folder, name in FOLDER_TO_IMPORT.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            rel_parts = path.relative_to(ROOT / folder).parts
            # the package holding the file is the deepest folder with an __init__.py
            depth = max(i for i in range(len(rel_parts)) if (ROOT / folder / Path(*rel_parts[:i]) / "__init__.py").exists()
                        or i == 0)
            package = ".".join((name, *rel_parts[:depth]))
            inner = "/".join(rel_parts[depth:])
            pats = patterns.get(package, []) + patterns.get("*", [])
            if not any(fnmatch.fnmatch(inner, p) for p in pats):
                missing.append(f"{folder}/{'/'.join(rel_parts)}")
    assert not missing, f"add to [tool.setuptools.package-data]: {missing}"
