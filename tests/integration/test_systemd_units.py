"""The unit files in systemd/: valid for systemd, hardened, consistent with each other."""

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
UNITS = ROOT / "systemd"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
SYSUSERS = shutil.which("systemd-sysusers")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not found")


def _tool_env() -> dict[str, str]:
    """Deterministic output: default log level (warnings shown), no colour, no pager."""
    env = dict(os.environ)
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", LC_ALL="C")
    return env


def _makima_script() -> Path:
    found = shutil.which("makima")
    script = Path(found) if found else Path(sys.executable).parent / "makima"
    assert script.is_file() and os.access(script, os.X_OK), f"no makima console script: {script}"
    return script


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The units copied aside, ExecStart= pointing at the real makima console script."""
    for name in ("makima.service", "makima.socket"):
        shutil.copy(UNITS / name, tmp_path / name)
    service = tmp_path / "makima.service"
    text = service.read_text()
    text, replaced = re.subn(
        r"^ExecStart=\S+", f"ExecStart={_makima_script()}", text, flags=re.MULTILINE
    )
    assert replaced == 1
    service.write_text(text)
    return tmp_path


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        env=_tool_env(),
        check=False,
        timeout=60,
    )


@needs_analyze
def test_units_verify_cleanly(installed: Path) -> None:
    result = _verify(installed / "makima.service", installed / "makima.socket")
    assert result.stderr == ""
    assert result.returncode == 0


@needs_analyze
def test_verify_would_notice_a_broken_unit(installed: Path) -> None:
    """The check above can fail: a bad key and a missing binary are reported."""
    service = installed / "makima.service"
    text = re.sub(
        r"^\[Service\]$", "[Service]\nNoSuchSetting=1", service.read_text(), flags=re.MULTILINE
    )
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/nonexistent/makima", text, flags=re.MULTILINE)
    service.write_text(text)
    result = _verify(service, installed / "makima.socket")
    assert result.returncode != 0
    assert "NoSuchSetting" in result.stderr
    assert "/nonexistent/makima" in result.stderr


@needs_analyze
def test_service_exposure_is_low(installed: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(installed / "makima.service")],
        capture_output=True,
        text=True,
        env=_tool_env(),
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for makima\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_service_contract() -> None:
    service = UNITS / "makima.service"
    assert one_directive(service, "Service", "Type") == "notify"
    assert one_directive(service, "Service", "NotifyAccess") == "main"
    assert one_directive(service, "Service", "ExecStart").split()[1:] == ["daemon"]
    assert one_directive(service, "Service", "Restart") == "on-failure"
    assert one_directive(service, "Service", "KillMode") == "mixed"
    assert one_directive(service, "Service", "WatchdogSec")
    assert one_directive(service, "Service", "TimeoutStopSec")
    assert one_directive(service, "Service", "User") == "makima"
    assert one_directive(service, "Service", "Group") == "makima"
    assert one_directive(service, "Service", "StateDirectory") == "makima"
    assert one_directive(service, "Service", "StateDirectoryMode") == "0700"
    assert one_directive(service, "Service", "RuntimeDirectory") == "makima"
    assert one_directive(service, "Unit", "Requires") == "makima.socket"
    assert "makima.socket" in one_directive(service, "Unit", "After").split()


def test_stop_kills_the_whole_control_group() -> None:
    """A task's descendant may leave its process group (setsid) and its environment;
    it stays in the service's control group, which the final SIGKILL covers: with
    KillMode=mixed the daemon alone gets SIGTERM, then every process of the group
    left over gets SIGKILL (control-group would be as good, process or none not)."""
    service = UNITS / "makima.service"
    assert one_directive(service, "Service", "KillMode") in ("mixed", "control-group")
    settings = dict(directives(service)["Service"])
    assert settings.get("SendSIGKILL", "yes") == "yes"
    assert settings.get("FinalKillSignal", "SIGKILL") in ("SIGKILL", "9")


def test_socket_contract() -> None:
    sock = UNITS / "makima.socket"
    listen = one_directive(sock, "Socket", "ListenStream")
    assert listen == "/run/makima.sock"
    # Not inside the service's RuntimeDirectory, which goes away when the service stops.
    runtime = "/run/" + one_directive(UNITS / "makima.service", "Service", "RuntimeDirectory")
    assert not listen.startswith(runtime + "/")
    assert one_directive(sock, "Socket", "SocketMode") == "0660"
    assert one_directive(sock, "Socket", "SocketGroup") == "makima"
    assert one_directive(sock, "Socket", "RemoveOnStop") == "yes"


@pytest.mark.skipif(SYSUSERS is None, reason="systemd-sysusers not found")
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-sysusers --root writes root-owned files")
def test_sysusers_creates_the_account(tmp_path: Path) -> None:
    assert SYSUSERS is not None
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [SYSUSERS, f"--root={tmp_path}", str(UNITS / "makima.sysusers")],
        capture_output=True,
        text=True,
        env=_tool_env(),
        check=True,
        timeout=60,
    )
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    user = passwd["makima"]
    assert int(user[2]) < 1000  # a system account
    assert user[3] == groups["makima"][2]  # primary group makima
    assert user[5] == "/var/lib/makima"  # the StateDirectory
    assert user[6].endswith("nologin")
