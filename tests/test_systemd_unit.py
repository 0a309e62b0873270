"""The shipped systemd unit: `systemd-analyze verify` clean and `systemd-analyze security` exposure <= 2.0.

Debian's ``systemd`` package brings systemd-analyze (`.ci/run` installs it); without it both tests are skipped.
The example config next to the unit validates as ``latticewatch check-config`` would.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from latticewatch.config import load_config

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD / "latticewatch.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")


@needs_analyze
def test_unit_verifies(tmp_path):
    # verify wants ExecStart's program to exist: the unit's /opt/latticewatch/venv is where the README installs it,
    # so a copy runs this environment's latticewatch instead
    program = shutil.which("latticewatch") or sys.executable
    text = UNIT.read_text()
    assert "ExecStart=/opt/latticewatch/venv/bin/latticewatch run" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/latticewatch/venv/bin/latticewatch", program))
    result = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@needs_analyze
def test_unit_exposure_is_at_most_2():
    result = subprocess.run([ANALYZE, "security", "--offline=yes", str(UNIT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    exposure = float(re.search(r"Overall exposure level for latticewatch\.service: ([0-9.]+)", result.stdout)[1])
    assert exposure <= 2.0, result.stdout


def test_unit_and_example_config_agree():
    """The service's promises that the daemon keeps: notify with a watchdog, state where the unit allows writes."""
    unit = dict(line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and line[0] != "#")
    assert unit["Type"] == "notify" and unit["WatchdogSec"] and unit["Restart"] == "on-failure"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    config = load_config(SYSTEMD / "latticewatch.toml")
    writable = unit["ReadWritePaths"].replace("-", "").split()
    assert str(config.state_dir).startswith(writable[0]) and str(config.archive_root).startswith(writable[0])
    assert config.state_dir.parent == Path("/var/lib") / unit["StateDirectory"]
