"""Hostile input for a running daemon, and the checks that it survives it.

Two halves:

- **Generators** (pure, driven by a seeded ``random.Random``; the test suite
  adds hypothesis strategies for the calls, in tests/fuzz). They make hostile
  makima-control/1 frames (:func:`random_frames`, :func:`every_wrong_param`,
  :func:`catalogue`, :func:`boundary_frames`, :func:`closing_frames`) and
  hostile makima-agent/1 lines (:func:`random_agent_lines`, :func:`every_wrong_field`):
  bad JSON, invalid UTF-8, NUL, lone surrogates, NaN and out-of-range numbers,
  deep nesting, wrong types for every parameter of every method, ids of every
  JSON type, oversized and partial lines. Each carries what must come back
  for it: the oracle is DESIGN §8 and §9 written here again (:func:`judge`,
  :func:`expect_call`), on purpose not borrowed from the daemon's own parsers.
- **A runner** (:class:`Fuzzer`) that sends them to a daemon process and,
  after each batch, checks that the daemon still answers, that a canary
  supervisor kept everything acknowledged to it (questions, answers, its
  checkpoint), and that the daemon's RSS stays bounded. It also runs slow and
  never-reading clients, an agent that writes hostile lines, and an agent
  that reads nothing and is cancelled. It counts frames, replies by code,
  crashes (the daemon process gone) and hangs (no answer within a deadline).

``makima drill --fuzz N`` runs :func:`run_fuzz_drill` against a real daemon on
a scratch state directory. The agents the runner starts live here too:
``python -m makima.fuzz canary | lines PLAN LOG | sink``.
"""

from makima.fuzz.agent_lines import every_wrong_field, random_agent_lines
from makima.fuzz.frames import (
    ClosingFrame,
    Frame,
    boundary_frames,
    call_frame,
    catalogue,
    closing_frames,
    every_wrong_param,
    random_frames,
)
from makima.fuzz.json_text import has_unstorable
from makima.fuzz.oracle import (
    COMMON_WRONG,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHODS,
    NOT_PROGRAMS,
    Ids,
    Kind,
    Param,
    Verdict,
    defang_command,
    expect_call,
    judge,
    near_misses,
    valid_value,
)
from makima.fuzz.runner import Fuzzer, FuzzReport, FuzzSettings, mib, run_fuzz_drill

__all__ = [
    "COMMON_WRONG",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "METHODS",
    "NOT_PROGRAMS",
    "ClosingFrame",
    "Frame",
    "FuzzReport",
    "FuzzSettings",
    "Fuzzer",
    "Ids",
    "Kind",
    "Param",
    "Verdict",
    "boundary_frames",
    "call_frame",
    "catalogue",
    "closing_frames",
    "defang_command",
    "every_wrong_field",
    "every_wrong_param",
    "expect_call",
    "has_unstorable",
    "judge",
    "mib",
    "near_misses",
    "random_agent_lines",
    "random_frames",
    "run_fuzz_drill",
    "valid_value",
]
