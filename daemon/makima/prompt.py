"""Asking a person on the terminal."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.text import Text

err = Console(stderr=True, soft_wrap=True)


def prompt_answer(question: dict[str, Any]) -> str:
    """Ask a person on the terminal (choices by number or text)."""
    err.print(Text(question["question"], style="bold"))  # the agent's words, not markup
    if question.get("context"):
        err.print(question["context"], markup=False, highlight=False)
    choices: list[str] = question.get("choices") or []
    if not choices:
        while True:
            text = click.prompt("answer", err=True).strip()
            if text:
                return text
    for n, choice in enumerate(choices, 1):
        err.print(f"  {n}) {choice}", markup=False)
    while True:
        text = click.prompt("choice", err=True).strip()
        if text.isdigit() and 1 <= int(text) <= len(choices):
            return choices[int(text) - 1]
        if text in choices:
            return text
        err.print(f"please type a number from 1 to {len(choices)} or one of the choices")
