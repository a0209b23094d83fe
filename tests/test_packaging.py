"""Every lmforge package is listed in pyproject.toml (explicitly, because recipes/ ships as lmforge.recipes)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "lmforge").rglob("__init__.py")} | {
        "lmforge.recipes"
    }
    assert found == listed
