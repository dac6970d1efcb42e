"""How restoration's pure checks grow with a supervisor's tasks and questions.

Restoration validates every unfinished supervisor in memory before starting
any (DESIGN §7, §14), so ``validate_supervisor_state`` and ``repair_state``
must stay linear in the number of spawned tasks and questions. This times
both for N and 2N of each and prints the ratio: about 2 means linear, about 4
quadratic.

    .venv/bin/python bench/validation.py [--n N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from makima.model import (
    PendingQuestion,
    QuestionRecord,
    SupervisorSpec,
    SupervisorState,
    TaskRecord,
    TaskStatus,
)
from makima.model import SupervisorStateEnum as S
from makima.validation import LoadedSupervisor, repair_state, validate_supervisor_state

START = datetime(2026, 1, 1, tzinfo=UTC)


def scenario(n: int) -> tuple[LoadedSupervisor, SupervisorState]:
    """n tasks (half listed, one listed id without a row) and n questions (half
    pending, a quarter answered, the rest open but unlisted): every rule has work."""
    spec = SupervisorSpec.new("bench", ["true"])
    sid = spec.supervisor_id
    tasks = tuple(
        TaskRecord(
            task_id=uuid.uuid4(),
            supervisor_id=sid,
            name=f"t{i}",
            command=("true",),
            status=TaskStatus.SUCCEEDED,
        )
        for i in range(n)
    )
    questions = tuple(
        QuestionRecord(
            question_id=uuid.uuid4(),
            supervisor_id=sid,
            question=f"q{i}?",
            choices=(),
            context=None,
            asked_at=START + timedelta(seconds=i),
            answer="yes" if i % 4 == 3 else None,
        )
        for i in range(n)
    )
    state = SupervisorState(
        supervisor_id=sid,
        state=S.WAITING_FOR_USER,
        spawned_task_ids=(*(t.task_id for t in tasks[: n // 2]), uuid.uuid4()),
        pending_questions=tuple(
            PendingQuestion(id=q.question_id, question=q.question, asked_at=q.asked_at)
            for q in questions[: n // 2]
        ),
    )
    return LoadedSupervisor(spec, state, tasks, questions), state


def seconds(n: int, repeat: int) -> float:
    """The best of ``repeat`` runs of validate + repair on a size-n scenario."""
    loaded, state = scenario(n)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = validate_supervisor_state(loaded)
        repair_state(state, loaded.tasks, loaded.questions)
        best = min(best, time.perf_counter() - started)
        assert not result.is_valid  # the scenario breaks rules on purpose
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="tasks and questions (N)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per size; the best counts")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    if args.n < 2 or args.repeat < 1:
        parser.error(f"--n must be at least 2 and --repeat at least 1; got {args.n}, {args.repeat}")
    small = seconds(args.n, args.repeat)
    large = seconds(2 * args.n, args.repeat)
    ratio = large / small
    data = {"n": args.n, "seconds_n": small, "seconds_2n": large, "growth_ratio": ratio}
    if args.json:
        print(json.dumps(data))
        return
    print(f"validate + repair, N={args.n}:  {small * 1000:8.1f} ms")
    print(f"validate + repair, 2N={2 * args.n}: {large * 1000:8.1f} ms")
    print(f"growth ratio 2N/N: {ratio:.2f}  (about 2: linear; about 4: quadratic)")


if __name__ == "__main__":
    main()
