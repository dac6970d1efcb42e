"""The wheel carries schema.sql, byte for byte the top-level file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_top_level_schema(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("makima-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("makima/schema.sql")
        assert "makima/py.typed" in archive.namelist()
    assert shipped == (ROOT / "schema.sql").read_bytes()
