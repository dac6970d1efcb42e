"""systemd/makima-notify.service: a valid user unit that runs ``makima notify``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit_files import directives, one_directive

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "makima-notify.service"
ANALYZE = shutil.which("systemd-analyze")


def one(section: str, key: str) -> str:
    return one_directive(UNIT, section, key)


def test_the_user_unit_contract() -> None:
    command = one("Service", "ExecStart").split()
    assert command[0] == "%h/.local/bin/makima"
    assert command[1:] == ["notify", "--desktop"]
    assert one("Service", "Restart") == "on-failure"
    assert one("Install", "WantedBy") == "default.target"
    assert "User" not in dict(directives(UNIT)["Service"])  # it runs as the person
    assert "systemctl --user enable --now makima-notify.service" in UNIT.read_text()


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not found")
@pytest.mark.parametrize("mode", ["--user", "--system"])
def test_the_user_unit_verifies(mode: str, tmp_path: Path) -> None:
    assert ANALYZE is not None
    script = Path(sys.executable).parent / "makima"
    assert script.is_file()
    text, replaced = re.subn(
        r"^ExecStart=\S+", f"ExecStart={script}", UNIT.read_text(), flags=re.MULTILINE
    )
    assert replaced == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ)
    env.update(
        SYSTEMD_LOG_LEVEL="info",
        SYSTEMD_LOG_COLOR="0",
        SYSTEMD_PAGER="",
        LC_ALL="C",
        XDG_RUNTIME_DIR=str(runtime),
    )
    result = subprocess.run(
        [ANALYZE, mode, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.stderr == ""
    assert result.returncode == 0
