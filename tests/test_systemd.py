"""The units pass `systemd-analyze verify` (with ExecStart pointed at this checkout's dwsd,
since verify checks that the program exists)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
DWSD = Path(sys.executable).parent / "dwsd"


def verify(tmp_path: Path, unit: str, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / unit
    path.write_text(text.replace("%h/.local/bin/dwsd", str(DWSD))
                    .replace("/usr/local/bin/dwsd", str(DWSD)))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(autouse=True)
def _need_systemd_analyze() -> None:
    assert shutil.which("systemd-analyze"), "make test installs systemd (systemd-analyze)"


@pytest.mark.parametrize("source,unit", [("dwsd.service", "dwsd.service"),
                                         ("dwsd@.service", "dwsd@demo.service")])
def test_units_verify(tmp_path: Path, source: str, unit: str) -> None:
    proc = verify(tmp_path, unit, (UNITS / source).read_text())
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The oracle itself must be able to fail.
    broken = (UNITS / "dwsd.service").read_text().replace("Type=notify", "Type=bogus")
    proc = verify(tmp_path, "dwsd.service", broken)
    assert "bogus" in proc.stderr
