"""The drill's verdict: what it found on the way, and the agents' records held
against what the database stores (judged by :mod:`makima.cluster_drill.checks`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import makima.cluster_drill.checks as cc
from makima.cluster_drill.context import Journal
from makima.cluster_drill.database import SharedDatabase
from makima.cluster_drill.processes import Cluster
from makima.drill import Check


async def verify(
    journal: Journal, cluster: Cluster, db: SharedDatabase, refusals: Counter[str]
) -> list[Check]:
    """Every check of the drill, in the order the report shows them."""
    for refusal, count in refusals.most_common(3):
        journal.note(f"answers refused {count} times: {refusal}")
    ids = list(journal.created)
    stored = await db.stored(ids)
    records = cluster.book.refresh()
    members = cluster.members
    checks: list[Check] = []

    def check(name: str, problems: Sequence[str], total: int, what: str) -> None:
        detail = f"{total - min(len(problems), total)}/{total} {what}"
        if problems:
            detail += "; e.g. " + "; ".join(problems[:3])
            if len(problems) > 3:
                detail += f" (+{len(problems) - 3} more)"
        checks.append(Check(name, not problems, detail))

    for name, problems in journal.problems.items():
        check(name, problems, journal.totals.get(name, 0), "as required")
    check(
        "no control call answered with an internal error (-32603)",
        cluster.internal_errors,
        cluster.calls,
        "calls",
    )
    silent = [m.name for m in members if m.answers == 0]
    check(
        "answers went through every daemon's socket",
        [f"none through {n}" for n in silent],
        len(members),
        "sockets (" + ", ".join(f"{m.name}: {m.answers}" for m in members) + " answers)",
    )
    found = cc.overlaps(records)
    intervals = sum(len(p) for p in cc.processes(records).values())
    check(
        "no supervisor acknowledged in two agent processes at once",
        [o.describe() for o in found],
        intervals,
        "agent processes without overlap",
    )
    questions, tasks = cc.acknowledged_counts(records)
    lost = cc.lost_acknowledgements(records, journal.accepted, stored)
    check(
        "no acknowledged question, answer or task lost",
        lost,
        questions + tasks + len(journal.accepted),
        "questions, tasks and answers in the database",
    )
    deliveries = cluster.book.deliveries()
    answered = sum(1 for a in stored.questions.values() if a is not None)
    check(
        "each answer reached its agent, at most once per process",
        cc.delivery_problems(deliveries, stored),
        answered,
        "answered questions",
    )
    check(
        "every supervisor completed, no question left open",
        cc.unfinished(stored, ids),
        len(ids),
        "completed",
    )
    codes = [
        f"{members[i].name} exited {c}" for i, c in sorted(cluster.stop_codes.items()) if c != 0
    ]
    check("every daemon stops cleanly (SIGTERM)", codes, len(cluster.stop_codes), "exit 0")
    return checks
