"""Pure parts of the robustness work: the restart policy, the fault plan, the
start-line fitting, shallow ref recovery, env/command validation, and the
SDK's handling of a dropped line."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from makima.agent import AgentProtocolError, ErrorCode, encode, parse_agent_line
from makima.daemon import first_error
from makima.errors import EmbeddedDatabaseError, InvalidValueError, crash_reason
from makima.faults import FaultAction, FaultHook, FaultPlan, InjectedFault, Moment, SavePoint
from makima.jsonline import top_level_member
from makima.limits import encoded_size, fit_newest
from makima.model import (
    MessageRecord,
    QuestionRecord,
    RestorationSource,
    SupervisorRestorationContext,
    SupervisorState,
    SupervisorStateEnum,
    TaskRecord,
    TaskStatus,
    parse_command,
    parse_env,
)
from makima.restoration import fit_restoration
from makima.runner import RestartPolicy, next_restart


def test_restart_policy_backs_off_then_gives_up() -> None:
    policy = RestartPolicy(limit=2, window=60.0, backoff=0.5)
    first = next_restart(policy, (), 100.0, "exit status 1")
    assert first.delay == 0.5 and first.restarts == (100.0,)
    second = next_restart(policy, first.restarts, 101.0, "exit status 1")
    assert second.delay == 1.0
    third = next_restart(policy, second.restarts, 102.0, "the agent took nothing")
    assert third.delay is None and "3 times within 60s" in third.reason
    assert "the agent took nothing" in third.reason
    # restarts older than the window are forgotten
    later = next_restart(policy, second.restarts, 200.0, "exit status 1")
    assert later.delay == 0.5 and later.restarts == (200.0,)


def test_crash_reason_names_the_exceptions_inside_groups() -> None:
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [ValueError("bad env")])])
    reason = crash_reason(group, "running its agent")
    assert reason.endswith("running its agent: ValueError: bad env")


def test_a_daemon_ending_on_a_makima_error_says_that_error() -> None:
    error = EmbeddedDatabaseError("restarted 6 times within 60s")
    assert first_error(ExceptionGroup("g", [ExceptionGroup("h", [error])])) is error
    assert first_error(ExceptionGroup("g", [error, ValueError("bug")])) is None


def test_fault_plan_raise_for_one_supervisor() -> None:
    plan = FaultPlan.parse("phase:before_commit:2:raise", supervisor="victim")
    assert plan == FaultPlan(SavePoint.PHASE, Moment.BEFORE_COMMIT, 2, FaultAction.RAISE, "victim")
    hook = FaultHook(plan)
    hook.reached(SavePoint.PHASE, Moment.BEFORE_COMMIT, "other")  # not counted
    hook.reached(SavePoint.PHASE, Moment.BEFORE_COMMIT, "victim")  # first
    with pytest.raises(InjectedFault):
        hook.reached(SavePoint.PHASE, Moment.BEFORE_COMMIT, "victim")
    assert FaultPlan.parse("ask:after_commit").action is FaultAction.KILL
    env = {"MAKIMA_FAULT": "restore:before_commit:raise", "MAKIMA_FAULT_SUPERVISOR": "x"}
    assert FaultHook.from_env(env).plan == FaultPlan(
        SavePoint.RESTORE, Moment.BEFORE_COMMIT, 1, FaultAction.RAISE, "x"
    )
    with pytest.raises(InvalidValueError):
        FaultPlan.parse("phase:before_commit:raise:2")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"A=B": "x"}, "'A=B' is not a valid variable name"),
        ({"": "x"}, "'' is not a valid variable name"),
        ({"A\x00": "x"}, "is not a valid variable name"),
        ({"A": "x\x00"}, "holds a NUL character"),
        ({"A": 1}, "must map strings to strings"),
        (["A"], "must be an object"),
    ],
)
def test_env_names_and_values_are_checked(env: object, fragment: str) -> None:
    with pytest.raises(InvalidValueError, match="env") as refused:
        parse_env(env)
    assert fragment in str(refused.value)


def test_a_stored_env_is_read_without_the_strict_checks() -> None:
    assert parse_env({"A=B": "x"}, strict=False) == {"A=B": "x"}


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        ([], "must not be empty"),
        ([""], "command[0] must name a program"),
        (["sh", "a\x00b"], "command[1] holds a NUL character"),
        ("sh -c x", "must be a list of strings"),
    ],
)
def test_commands_are_checked(command: object, fragment: str) -> None:
    with pytest.raises(InvalidValueError) as refused:
        parse_command(command)
    assert fragment in str(refused.value)


def test_error_messages_quote_hostile_input_briefly() -> None:
    with pytest.raises(InvalidValueError) as refused:
        parse_command("x" * 1_000_000)
    assert len(str(refused.value)) < 200


def test_the_ref_of_a_line_nested_too_deeply_is_read() -> None:
    deep = "[" * 50_000 + "]" * 50_000
    line = f'{{"type":"message","content":{deep},"ref":"r-9"}}'.encode()
    with pytest.raises(AgentProtocolError) as refused:
        parse_agent_line(line)
    assert refused.value.ref == "r-9" and refused.value.code is ErrorCode.MALFORMED
    # a nested "ref" is not the message's own
    assert top_level_member(b'{"a":{"ref":"inner"},"type":"x"', "ref") is None
    assert top_level_member(b'{"ref": 12, "x": [', "ref") == 12
    assert top_level_member(b'{"ref": {"no": 1}', "ref") is None
    assert top_level_member(b"\xff\xfe", "ref") is None


@given(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=5), st.text(max_size=8))
def test_top_level_member_agrees_with_json_on_valid_objects(obj: dict[str, str], ref: str) -> None:
    line = json.dumps({**obj, "ref": ref}).encode()
    assert top_level_member(line, "ref") == ref


def _context(history: int, tasks: int, answers: int, size: int) -> SupervisorRestorationContext:
    sid = uuid.uuid4()
    now = datetime.now(UTC)
    state = SupervisorState(
        supervisor_id=sid, state=SupervisorStateEnum.WORKING, checkpoint_data={"c": "k" * size}
    )
    return SupervisorRestorationContext(
        supervisor_id=sid,
        source=RestorationSource.AGENT_RESTART,
        restoration_count=1,
        context_message="m" * size,
        state=state,
        history=tuple(MessageRecord(sid, n + 1, "r", "h" * size, now) for n in range(history)),
        tasks=tuple(
            TaskRecord(
                uuid.uuid4(),
                sid,
                f"t{n}",
                ("true",),
                status=TaskStatus.SUCCEEDED if n % 2 else TaskStatus.RUNNING,
                output_tail="o" * size,
            )
            for n in range(tasks)
        ),
        undelivered_answers=tuple(
            QuestionRecord(uuid.uuid4(), sid, f"q{n}", (), None, now, answer="a" * size)
            for n in range(answers)
        ),
    )


@given(
    st.integers(0, 30),
    st.integers(0, 10),
    st.integers(0, 5),
    st.integers(1, 3000),
    st.integers(2_000, 60_000),
)
def test_a_fitted_restoration_stays_within_its_budget(
    history: int, tasks: int, answers: int, size: int, budget: int
) -> None:
    context = _context(history, tasks, answers, size)
    fitted = fit_restoration(context, budget)
    assert fitted.restoration is not None
    bare = dataclasses.replace(
        context, history=(), tasks=(), undelivered_answers=(), context_message=""
    )
    mandatory = fit_restoration(bare, 0).restoration
    assert encoded_size(fitted.restoration) <= max(budget, encoded_size(mandatory))
    # every answer goes somewhere, once
    inline = {q.question_id for q in fitted.answers_inline}
    after = {q.question_id for q in fitted.answers_after}
    assert not inline & after
    assert inline | after == {q.question_id for q in context.undelivered_answers}
    # history: a contiguous run of the newest entries
    seqs = [m["seq"] for m in fitted.restoration["history"]]
    assert seqs == list(range(history - len(seqs) + 1, history + 1))
    assert fitted.restoration["history_more"] == (bool(history) and (not seqs or seqs[0] > 1))
    # unfinished tasks go before finished ones
    kept = {t["name"] for t in fitted.restoration["tasks"]}
    assert fitted.restoration["tasks_omitted"] == tasks - len(kept)


def test_a_fitted_restoration_that_fits_is_whole() -> None:
    context = _context(3, 2, 1, 10)
    fitted = fit_restoration(context, 1 << 20)
    assert fitted.restoration is not None
    assert fitted.restoration["context_message"] == context.context_message
    assert len(fitted.restoration["history"]) == 3 and fitted.restoration["tasks_omitted"] == 0
    assert not fitted.answers_after and not fitted.restoration["history_more"]


def test_fit_newest_keeps_the_newest_in_order() -> None:
    entries = [{"n": n, "x": "y" * 100} for n in range(10)]
    kept, cut = fit_newest(entries, budget=3 * (encoded_size(entries[0]) + 1))
    assert [e["n"] for e in kept] == [7, 8, 9] and cut
    assert fit_newest(entries) == (entries, False)


def test_a_ref_with_a_lone_surrogate_is_refused_and_echoed() -> None:
    """Echoing it killed the daemon (UTF-8 cannot carry it): it goes back escaped."""
    with pytest.raises(AgentProtocolError) as refused:
        parse_agent_line(b'{"type":"activity","text":"x","ref":"\\ud800"}')
    assert refused.value.code is ErrorCode.INVALID and refused.value.ref == "\ud800"
    assert "lone surrogate" in str(refused.value)
    assert encode({"type": "ack", "ref": "\ud800"}) == b'{"type":"ack","ref":"\\ud800"}\n'


def test_a_message_without_content_is_invalid() -> None:
    with pytest.raises(AgentProtocolError) as refused:
        parse_agent_line(b'{"type":"message","role":"r","content":null,"ref":1}')
    assert refused.value.code is ErrorCode.INVALID and refused.value.ref == 1


def test_the_ref_scan_is_linear_on_unterminated_escaped_quotes() -> None:
    """A scan that retried every escaped quote took hours on a 1 MiB line, with the
    event loop (every supervisor) blocked; the suite's timeout fails it."""
    line = b'{"ref":"r","x":"' + b'\\"' * 500_000
    assert top_level_member(line, "ref") == "r"
    assert top_level_member(b'"' + b'\\"' * 500_000, "ref") is None


def test_a_long_ref_is_not_echoed() -> None:
    with pytest.raises(AgentProtocolError) as refused:
        parse_agent_line(b'{"type":"activity","text":"x","ref":"' + b"r" * 300 + b'"}')
    assert refused.value.ref is None and "ref is too long" in str(refused.value)
    with pytest.raises(AgentProtocolError) as malformed:
        parse_agent_line(b'{"ref":"' + b"r" * 300 + b'", "type": [')
    assert malformed.value.ref is None
    with pytest.raises(AgentProtocolError) as unknown:
        parse_agent_line(b'{"type":"' + b"t" * 100_000 + b'","ref":1}')
    assert unknown.value.ref == 1 and len(str(unknown.value)) < 400


def test_the_startup_report_in_status_is_bounded() -> None:
    from makima.api import fit_report

    entry = {"supervisor_id": "x" * 36, "name": "n" * 50, "state": "working", "issues": []}
    report = {
        "counts": {"restored": 20_000, "failed": 2},
        "restored": [entry] * 20_000,
        "failed": [{**entry, "issues": ["broken"]}] * 2,
    }
    fitted = fit_report(report, budget=64 * 1024)
    assert fitted["counts"] == report["counts"]
    assert len(fitted["failed"]) == 2  # what needs a look comes first
    assert 0 < len(fitted["restored"]) < 20_000
    assert fitted["omitted"] == 20_000 - len(fitted["restored"])
    assert fit_report(None) is None
