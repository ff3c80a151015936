"""The import contracts in pyproject.toml ([tool.importlinter]: layers that import downward
only, no cycles between sibling modules), checked by import-linter on the package as installed.

pyproject's ``package-dir`` maps passes/, patterns/, codegen/ and cli/ into the one
``rewriter`` package; an editable install resolves them through an import hook that
import-linter's file walk does not follow, so the test lays the package out as a wheel would
(a copy per ``package-dir`` entry) and lints that."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def installed_layout(target: Path) -> Path:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = config["tool"]["setuptools"]["package-dir"]
    for package, source in sorted(package_dirs.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(ROOT / source, target.joinpath(*package.split(".")),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def lint(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not LINT.exists():
        pytest.fail(f"import-linter is not installed next to {sys.executable} (dev extra)")
    return installed_layout(tmp_path_factory.mktemp("site"))


def test_layers_and_no_cycles(site):
    result = lint(site)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_is_caught(site, tmp_path):
    """The contracts are live: an ir module importing the program layer breaks them."""
    broken = installed_layout(tmp_path / "broken")
    bad = broken / "rewriter" / "ir" / "masks.py"
    bad.write_text(bad.read_text() + "\nfrom rewriter.program import Program  # noqa\n")
    result = lint(broken)
    assert result.returncode != 0
    assert "rewriter.ir.masks -> rewriter.program" in result.stdout


def test_every_package_is_installed():
    """pyproject lists every package folder (a wheel would otherwise lack it)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, source in config["package-dir"].items():
        for init in (ROOT / source).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / source)
            found.add(".".join([package, *rel.parts]))
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"


if __name__ == "__main__":  # the contract report: .venv/bin/python tests/test_architecture.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = lint(installed_layout(Path(tmp)))
        print(report.stdout, report.stderr, sep="", end="")
        sys.exit(report.returncode)
