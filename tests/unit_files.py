"""Reading systemd unit files in tests: their directives, section by section."""

from __future__ import annotations

from pathlib import Path


def directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section → (key, value) pairs in order (unit files repeat keys)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def one_directive(path: Path, section: str, key: str) -> str:
    """The value of a directive that must appear exactly once."""
    values = [v for k, v in directives(path).get(section, []) if k == key]
    assert len(values) == 1, f"{path.name} [{section}] {key}= appears {len(values)} times"
    return values[0]
