"""Hostile input against a real daemon process (makima.fuzz): control frames
(every parameter of every method with every wrong type; hypothesis-drawn calls;
bad JSON, invalid UTF-8, NUL, lone surrogates, NaN, deep nesting, ids of every
type, lines at and over 1 MiB, partial lines), hostile agent lines, slow and
never-reading clients, an agent that reads nothing. After each step the daemon
must answer, have lost nothing acknowledged (a canary supervisor), and keep its
RSS bounded.

A bounded count runs here. MAKIMA_FUZZ_FRAMES=N makes the mix N frames,
MAKIMA_FUZZ_EXAMPLES=N the hypothesis examples, MAKIMA_FUZZ_SEED=S repeats a run
(every failure names its seed); `makima drill --fuzz N` runs the large count
on its own scratch daemon and embedded PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from makima import fuzz
from makima.embedded import ConnectParams
from tests.fuzz.conftest import fuzz_settings
from tests.fuzz.strategies import calls
from tests.harness import dsn
from tests.process import DaemonProcess

pytestmark = [pytest.mark.anyio, pytest.mark.fuzz]

FRAMES = int(os.environ.get("MAKIMA_FUZZ_FRAMES", "1200"))
EXAMPLES = int(os.environ.get("MAKIMA_FUZZ_EXAMPLES", "25"))


# --------------------------------------------------------------------------- generators


def test_generators_are_deterministic_and_never_name_a_program() -> None:
    """Same seed, same frames; every command a frame or line carries cannot run."""
    ids = fuzz.Ids()
    first = fuzz.random_frames(random.Random(7), 400, ids)
    second = fuzz.random_frames(random.Random(7), 400, ids)
    assert [f.data for f in first] == [f.data for f in second]
    lines = fuzz.random_agent_lines(random.Random(7), 400)
    programs: list[object] = []
    for data in [f.data for f in first] + [line.data for line in lines]:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            continue
        params = obj.get("params") if isinstance(obj, dict) else None
        for holder in (obj, params):
            if isinstance(holder, dict) and isinstance(holder.get("command"), list):
                programs.append(holder["command"][:1])
    runnable = [
        p for p in programs if p and isinstance(p[0], str) and p[0] and not fuzz.has_unstorable(p)
    ]
    assert runnable, "the generators should make commands that pass the type checks"
    assert all(p[0] in fuzz.NOT_PROGRAMS for p in runnable), runnable[:5]


@given(calls())
def test_the_oracle_refuses_a_wrong_value_whatever_the_others(call: tuple[str, Any]) -> None:
    """And the calls hypothesis draws never name a program that could run."""
    method, params = call
    command = params.get("command")
    if isinstance(command, list) and command and isinstance(command[0], str) and command[0]:
        assert command[0] in fuzz.NOT_PROGRAMS or fuzz.has_unstorable(command[0])
    expect = fuzz.expect_call(method, params, fuzz.Ids())
    verdicts = [
        fuzz.judge(p, params[name]) for name, p in fuzz.METHODS[method].items() if name in params
    ]
    if fuzz.Verdict.WRONG in verdicts or fuzz.has_unstorable(params):
        assert expect == {fuzz.INVALID_PARAMS}
    assert fuzz.INTERNAL_ERROR not in expect


# --------------------------------------------------------------------------- control frames


async def test_every_wrong_param_and_every_fixed_hostile_form(
    daemon_proc: DaemonProcess, scratch: Path
) -> None:
    fuzzer = fuzz.Fuzzer(daemon_proc, fuzz_settings(), scratch)
    async with fuzzer.session():
        await fuzzer.control_batch(fuzz.every_wrong_param(fuzzer.ids))
        await fuzzer.check()
        await fuzzer.control_batch(fuzz.catalogue(fuzzer.ids) + fuzz.boundary_frames())
        await fuzzer.check()
    assert fuzzer.report.ok, fuzzer.report.describe()


async def test_lines_that_close_the_connection(daemon_proc: DaemonProcess, scratch: Path) -> None:
    """Over 1 MiB (with and without a newline, a \\r counted): -32600 and a hang-up;
    a partial last line then end of input: at most one reply and a hang-up."""
    fuzzer = fuzz.Fuzzer(daemon_proc, fuzz_settings(), scratch)
    rng = random.Random(fuzzer.report.seed)
    kinds: dict[str, fuzz.ClosingFrame] = {}
    while len(kinds) < 5:
        frame = fuzz.closing_frames(rng)[0]
        kinds.setdefault(frame.label, frame)
    async with fuzzer.session(canary=False):
        await fuzzer.closing(list(kinds.values()))
        await fuzzer.check()
    assert fuzzer.report.frames == len(kinds)
    assert fuzzer.report.ok, fuzzer.report.describe()


@pytest.fixture
async def restarting_fuzzer(
    daemon_proc: DaemonProcess, scratch: Path
) -> AsyncIterator[fuzz.Fuzzer]:
    """One daemon for every example; a crash is reported and the daemon started
    again, so that hypothesis's replay of a failing example finds it again."""
    fuzzer = fuzz.Fuzzer(daemon_proc, fuzz_settings(restart=True), scratch)
    async with fuzzer.session(canary=False):
        yield fuzzer


# Frames of every kind, drawn while hypothesis generates the example (a seeded
# generator: the async test body itself must draw nothing).
random_frames = st.randoms(use_true_random=True).map(
    lambda rng: fuzz.random_frames(rng, 6, fuzz.Ids())
)


@settings(
    max_examples=EXAMPLES,
    # A daemon takes seconds to restart after a crash: report the example as drawn.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    # The daemon is shared by the examples on purpose: hostile input piles up.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(drawn=st.lists(calls(), min_size=1, max_size=8), escape=st.booleans(), more=random_frames)
async def test_hypothesis_calls_and_frames(
    restarting_fuzzer: fuzz.Fuzzer,
    drawn: list[tuple[str, Any]],
    escape: bool,
    more: list[fuzz.Frame],
) -> None:
    fuzzer = restarting_fuzzer
    frames = [
        fuzz.call_frame(method, params, n, fuzz.Ids(), label="hypothesis call", escape=escape)
        for n, (method, params) in enumerate(drawn)
    ]
    before = sum(fuzzer.report.counts.values())
    await fuzzer.control_batch([*frames, *more])
    await fuzzer.check()
    assert sum(fuzzer.report.counts.values()) == before, fuzzer.report.describe()


# --------------------------------------------------------------------------- agent lines


async def test_hostile_agent_lines(daemon_proc: DaemonProcess, scratch: Path) -> None:
    fuzzer = fuzz.Fuzzer(daemon_proc, fuzz_settings(), scratch)
    lines = fuzz.every_wrong_field() + fuzz.random_agent_lines(fuzzer.rng, 150)
    async with fuzzer.session():
        await fuzzer.agent_lines(lines)
        await fuzzer.check()
    assert fuzzer.report.ok, fuzzer.report.describe()
    assert fuzzer.report.agent_lines == len(lines)


# --------------------------------------------------------------------------- the mix


@pytest.mark.timeout(max(120, FRAMES // 100))
async def test_fuzz_run(daemon_proc: DaemonProcess, scratch: Path) -> None:
    """The whole mix, as `makima drill --fuzz` runs it (MAKIMA_FUZZ_FRAMES frames):
    random frames in checked rounds, lines that close, clients that stall (flooding
    and never reading; holding 160 unfinished 1 MiB lines), hostile agent lines, an
    agent that reads nothing and is cancelled."""
    settings_ = fuzz_settings(frames=FRAMES, agent_lines=max(60, FRAMES // 50), slow_clients=6)
    fuzzer = fuzz.Fuzzer(daemon_proc, settings_, scratch)
    async with fuzzer.session():
        await fuzzer.run()
    report = fuzzer.report
    print(json.dumps(report.to_json(), indent=1)[:4000])  # the figures, with -s
    assert report.ok, report.describe()
    assert report.frames == FRAMES
    assert report.rss_before and report.rss_max and report.rss_after


async def test_makima_drill_fuzz(db_params: ConnectParams, short_tmp: Path) -> None:
    """The CLI: `makima drill --fuzz N --json` prints the figures and exits 0 or 1."""
    scratch = short_tmp / "drill-fuzz"
    command = [
        sys.executable,
        "-m",
        "makima",
        "drill",
        "--fuzz",
        "200",
        "--seed",
        "11",
        "--database-url",
        dsn(db_params),
        "--scratch",
        str(scratch),
        "--json",
    ]
    with anyio.fail_after(110):
        done = await anyio.run_process(command, check=False)
    assert done.returncode in (0, 1), done.stderr.decode()[-3000:]
    figures = json.loads(done.stdout)
    assert figures["frames"] == 200
    assert set(figures["rss_kib"]) == {"before", "max", "after"}
    assert figures["ok"] == (done.returncode == 0)
    assert figures["ok"], json.dumps(figures["problems"], indent=1)[:4000]
