"""What the cluster drill is asked to do, how far it got, and what it reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import makima.cluster_drill.checks as cc
from makima.drill import Check

SCENARIOS = ("kill", "pause", "terminate")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    daemons: int = 3
    supervisors: int = 30
    lease_ttl: float = 5.0
    lease_renew: float = 1.0
    rounds: int = 1
    scenarios: tuple[str, ...] = SCENARIOS
    seed: int | None = None
    database_url: str | None = None  # None: one embedded server in the scratch dir
    scratch: Path | None = None  # None: a new temporary directory, removed when all passed
    limit: float = 900.0  # seconds for the whole drill
    pace: float = 0.3  # the agents' pause between steps
    takeover_slack: float = 3.0  # beyond TTL + renew, for a takeover to count as in time
    call_timeout: float = 5.0

    @property
    def takeover_limit(self) -> float:
        return self.lease_ttl + self.lease_renew + self.takeover_slack


@dataclass
class ClusterProgress:
    phase: str = "starting"
    steps_done: int = 0
    steps: int = 0
    created: int = 0
    finished: int = 0
    answers: int = 0


@dataclass(frozen=True, slots=True)
class Takeover:
    """The supervisors of one daemon, and how long each took to resume elsewhere."""

    scenario: str
    round: int
    daemon: int
    times: Mapping[str, float | None]  # to the new agent's first record
    limit: float
    restored: Mapping[str, float | None]  # to ``last_restored_at`` (claimed and restored)


@dataclass(frozen=True, slots=True)
class TakeoverRow:
    """One scenario's takeovers: seconds from the event to the restoration (the new
    owner's ``last_restored_at``) and to the new agent's first record."""

    scenario: str
    resumed: int
    restored: cc.Stats
    started: cc.Stats
    limit: float

    def to_json(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "scenario": self.scenario,
            "resumed": self.resumed,
            "restored_median_s": r(self.restored.median),
            "restored_worst_s": r(self.restored.worst),
            "median_s": r(self.started.median),
            "worst_s": r(self.started.worst),
            "limit_s": self.limit,
        }


@dataclass
class ClusterReport:
    checks: list[Check]
    takeovers: list[Takeover]
    notes: list[str]
    daemons: int
    supervisors: int
    processes: int
    questions: int
    answers: int
    tasks: int
    answers_by_daemon: list[int]
    seconds: float
    scratch: Path
    seed: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def takeover_rows(self) -> list[TakeoverRow]:
        rows = []
        for scenario in SCENARIOS:
            mine = [t for t in self.takeovers if t.scenario == scenario]
            if not mine:
                continue
            started = cc.stats(v for t in mine for v in t.times.values() if v is not None)
            restored = cc.stats(v for t in mine for v in t.restored.values() if v is not None)
            rows.append(TakeoverRow(scenario, started.count, restored, started, mine[0].limit))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "daemons": self.daemons,
            "supervisors": self.supervisors,
            "agent_processes": self.processes,
            "questions": self.questions,
            "answers": self.answers,
            "answers_by_daemon": self.answers_by_daemon,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 1),
            "takeovers": [row.to_json() for row in self.takeover_rows()],
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "notes": self.notes,
            "scratch": str(self.scratch),
        }
