"""The FAB that `flwr build` makes: the app alone, no tests, scripts, docs or Hydra configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO


def test_fab_holds_only_the_app(tmp_path: Path):
    flwr = Path(sys.executable).with_name("flwr")
    done = subprocess.run(
        [str(flwr), "build", "--app", str(REPO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert {name.split("/")[0] for name in names} == {
        ".info",
        "LICENSE",
        "README.md",
        "fl_app",
        "pyproject.toml",
    }
    # Every module of the package travels: the SuperLink and SuperNodes import them from it.
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "fl_app").rglob("*.py")}
    assert package <= set(names)
