"""One supervisor never takes makima down: poison input is refused at both
protocol edges, and whatever still goes wrong inside one supervisor (an
injected fault, a poisoned spec saved by an older makima) fails that
supervisor alone, before and after a restart."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest
import structlog.testing

from makima import repository as repo
from makima.config import DaemonConfig
from makima.control.client import ControlClient, RemoteError
from makima.daemon import Daemon
from makima.database import create_pool
from makima.embedded import ConnectParams
from makima.faults import FaultAction, FaultHook, FaultPlan, Moment, SavePoint
from makima.model import SupervisorSpec
from tests.harness import (
    DEADLINE,
    AgentChannel,
    Relay,
    client_for,
    daemon_config,
    next_event,
)

pytestmark = pytest.mark.anyio

BAD_ENVS = [
    ({"A=B": "x"}, "'A=B' is not a valid variable name"),
    ({"": "x"}, "'' is not a valid variable name"),
]
BAD_COMMANDS = [
    ([], "command must not be empty"),
    ([""], "command[0] must name a program"),
    ("python", "command must be a list of strings"),
    (["python", 3], "command must be a list of strings"),
]


@pytest.mark.parametrize(("env", "expected"), BAD_ENVS)
async def test_create_refuses_a_poison_env_and_persists_nothing(
    daemon: Daemon, client: ControlClient, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(RemoteError) as refused:
        await client.call("supervisor.create", {"name": "p", "command": ["true"], "env": env})
    assert refused.value.code == -32602
    assert expected in refused.value.message
    assert (await client.call("supervisor.list", {"all": True}))["supervisors"] == []
    assert (await client.call("daemon.status"))["pid"]  # still up


@pytest.mark.parametrize(("command", "expected"), BAD_COMMANDS)
async def test_create_refuses_a_bad_command(
    daemon: Daemon, client: ControlClient, command: object, expected: str
) -> None:
    with pytest.raises(RemoteError) as refused:
        await client.call("supervisor.create", {"name": "p", "command": command})
    assert refused.value.code == -32602
    assert expected in refused.value.message
    assert (await client.call("supervisor.list", {"all": True}))["supervisors"] == []


async def start_agent(client: ControlClient, relay: Relay, name: str) -> tuple[str, AgentChannel]:
    created = await client.call("supervisor.create", {"name": name, "command": relay.command})
    agent = await relay.accept()
    start = await agent.expect("start")
    assert start["supervisor_id"] == created["supervisor_id"]
    return str(created["supervisor_id"]), agent


@pytest.mark.parametrize(
    ("env", "command", "expected"),
    [
        ({"A=B": "x"}, ["true"], "'A=B' is not a valid variable name"),
        ({"": "x"}, ["true"], "'' is not a valid variable name"),
        ({}, [""], "command[0] must name a program"),
        ({}, [], "command must not be empty"),
    ],
)
async def test_spawn_refuses_a_poison_task_and_persists_nothing(
    daemon: Daemon,
    client: ControlClient,
    relay: Relay,
    env: dict[str, str],
    command: list[str],
    expected: str,
) -> None:
    sid, agent = await start_agent(client, relay, "spawner")
    reply = await agent.request({"type": "spawn", "name": "t", "command": command, "env": env})
    assert reply["type"] == "error" and reply["code"] == "invalid"
    assert expected in reply["message"]
    assert await repo.get_tasks_for_supervisor(daemon.db.pool, uuid.UUID(sid)) == []
    assert (await agent.request({"type": "phase", "phase": "after"}))["type"] == "ack"
    assert (await client.call("daemon.status"))["pid"]


async def victim_and_bystander(config: DaemonConfig, relay: Relay) -> tuple[str, str]:
    """Two supervisors, "victim" and "bystander", left unfinished by a clean stop."""
    first = Daemon(config, handle_signals=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(first.run)
        async with client_for(first) as client:
            victim, _ = await start_agent(client, relay, "victim")
            bystander, _ = await start_agent(client, relay, "bystander")
        first.request_shutdown()
    return victim, bystander


def _raising(point: SavePoint, supervisor: str) -> FaultHook:
    return FaultHook(
        FaultPlan(point, Moment.BEFORE_COMMIT, action=FaultAction.RAISE, supervisor=supervisor)
    )


async def test_an_injected_fault_fails_one_supervisor_only_also_across_a_restart(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    config = daemon_config(db_params, short_tmp)
    daemon = Daemon(config, handle_signals=False, faults=_raising(SavePoint.PHASE, "victim"))
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(DEADLINE):
                await tg.start(daemon.run)
            async with client_for(daemon) as client, client.events() as events:
                victim, victim_agent = await start_agent(client, relay, "victim")
                bystander, agent = await start_agent(client, relay, "bystander")
                assert (await agent.request({"type": "phase", "phase": "one"}))["type"] == "ack"
                await victim_agent.send({"type": "phase", "phase": "boom", "ref": 1})
                failed = await next_event(
                    events, "supervisor.state_changed", supervisor_id=victim, state="failed"
                )
                assert "InjectedFault" in failed["error_message"]
                # its agent hears it is over (a cancel, then its stdin closes), never an ack
                while (message := await victim_agent.receive()) is not None:
                    assert message["type"] == "cancel"
                # the bystander goes on: a question, an answer
                asked = await agent.request({"type": "ask", "question": "go?"})
                await client.call(
                    "question.answer", {"question_id": asked["question_id"], "answer": "yes"}
                )
                assert (await agent.expect("answer"))["answer"] == "yes"
                body = await client.call("supervisor.get", {"supervisor_id": victim})
                assert body["state"] == "failed" and "InjectedFault" in body["error_message"]
            daemon.request_shutdown()
    crashed = [e for e in logs if e["event"] == "supervisor.crashed"]
    assert len(crashed) == 1 and crashed[0]["supervisor_id"] == victim
    assert crashed[0]["exc_info"] is not None  # with the traceback

    # Across a restart: the bystander is restored, the victim stays failed.
    again = Daemon(config, handle_signals=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(again.run)
        restored = await relay.accept()
        start = await restored.expect("start")
        assert start["supervisor_id"] == bystander
        assert start["restoration"]["source"] == "daemon_restart"
        report = again.startup_report
        assert report is not None
        assert [e["supervisor_id"] for e in report["restored"]] == [bystander]
        async with client_for(again) as client:
            body = await client.call("supervisor.get", {"supervisor_id": victim})
            assert body["state"] == "failed"
            assert (await restored.request({"type": "phase", "phase": "two"}))["type"] == "ack"
        again.request_shutdown()


async def test_a_restoration_that_raises_is_reported_failed_and_startup_goes_on(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    config = daemon_config(db_params, short_tmp)
    victim, bystander = await victim_and_bystander(config, relay)

    second = Daemon(config, handle_signals=False, faults=_raising(SavePoint.RESTORE, "victim"))
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(DEADLINE):
                await tg.start(second.run)  # READY, though one restoration raised
            report = second.startup_report
            assert report is not None
            assert [e["supervisor_id"] for e in report["failed"]] == [victim]
            assert "InjectedFault" in report["failed"][0]["issues"][0]
            assert [e["supervisor_id"] for e in report["restored"]] == [bystander]
            agent = await relay.accept()
            assert (await agent.expect("start"))["supervisor_id"] == bystander
            async with client_for(second) as client:
                body = await client.call("supervisor.get", {"supervisor_id": victim})
                assert body["state"] == "failed" and "InjectedFault" in body["error_message"]
            second.request_shutdown()
    assert [e["supervisor_id"] for e in logs if e["event"] == "supervisor.crashed"] == [victim]


async def test_a_poisoned_spec_saved_earlier_fails_alone_and_the_daemon_stays_up(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    """An older makima accepted env {"A=B": …}: its agent cannot start. Before the
    crash boundary the daemon exited at every start (a crash loop under systemd)."""
    pool = await create_pool(db_params, min_size=1, max_size=1)
    try:
        poisoned = SupervisorSpec(uuid.uuid4(), "poisoned", tuple(relay.command), env={"A=B": "x"})
        healthy = SupervisorSpec(uuid.uuid4(), "healthy", tuple(relay.command))
        await repo.create_supervisor(pool, poisoned)
        await repo.create_supervisor(pool, healthy)
    finally:
        await pool.close()
    daemon = Daemon(daemon_config(db_params, short_tmp), handle_signals=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(daemon.run)
        async with client_for(daemon) as client, client.events() as events:
            agent = await relay.accept()
            assert (await agent.expect("start"))["supervisor_id"] == str(healthy.supervisor_id)
            body = await client.call(
                "supervisor.get", {"supervisor_id": str(poisoned.supervisor_id)}
            )
            if body["state"] != "failed":
                await next_event(
                    events,
                    "supervisor.state_changed",
                    supervisor_id=str(poisoned.supervisor_id),
                    state="failed",
                )
                body = await client.call(
                    "supervisor.get", {"supervisor_id": str(poisoned.supervisor_id)}
                )
            assert "ValueError" in body["error_message"]
            assert (await agent.request({"type": "phase", "phase": "on"}))["type"] == "ack"
            assert (await client.call("daemon.status"))["running_agents"] == 1
        daemon.request_shutdown()


async def test_a_restored_state_the_database_refuses_fails_that_supervisor_only(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    """Before, one refused save of a restored state aborted the whole startup."""
    config = daemon_config(db_params, short_tmp)
    victim, bystander = await victim_and_bystander(config, relay)
    pool = await create_pool(db_params, min_size=1, max_size=1)
    try:  # the database itself refuses any state but failed for the victim
        await pool.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$"
        )
        await pool.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON supervisor_states FOR EACH ROW "
            f"WHEN (NEW.supervisor_id = '{victim}' AND NEW.state <> 'failed') "
            "EXECUTE FUNCTION refuse()"
        )
    finally:
        await pool.close()
    second = Daemon(config, handle_signals=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(second.run)
        report = second.startup_report
        assert report is not None
        assert [e["supervisor_id"] for e in report["failed"]] == [victim]
        assert "refused for the test" in report["failed"][0]["issues"][0]
        agent = await relay.accept()
        assert (await agent.expect("start"))["supervisor_id"] == bystander
        async with client_for(second) as client:
            body = await client.call("supervisor.get", {"supervisor_id": victim})
            assert body["state"] == "failed"
        second.request_shutdown()


async def test_a_row_that_cannot_be_read_fails_its_supervisor_only(
    db_params: ConnectParams, short_tmp: Path, relay: Relay
) -> None:
    """A spec with an empty name (what an older schema's upgrade leaves) made the
    bulk load raise, and the daemon never became ready."""
    pool = await create_pool(db_params, min_size=1, max_size=1)
    try:
        healthy = SupervisorSpec(uuid.uuid4(), "healthy", tuple(relay.command))
        await repo.create_supervisor(pool, healthy)
        broken = uuid.uuid4()
        await pool.execute(
            "INSERT INTO supervisors (supervisor_id, name, goal, agent_command) "
            "VALUES ($1, '', '', $2)",
            broken,
            relay.command,
        )
        await pool.execute(
            "INSERT INTO supervisor_states (supervisor_id, state) VALUES ($1, 'working')", broken
        )
    finally:
        await pool.close()
    daemon = Daemon(daemon_config(db_params, short_tmp), handle_signals=False)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(DEADLINE):
            await tg.start(daemon.run)
        report = daemon.startup_report
        assert report is not None
        assert [e["supervisor_id"] for e in report["failed"]] == [str(broken)]
        assert "cannot be read" in report["failed"][0]["issues"][0]
        assert [e["supervisor_id"] for e in report["restored"]] == [str(healthy.supervisor_id)]
        agent = await relay.accept()
        assert (await agent.expect("start"))["supervisor_id"] == str(healthy.supervisor_id)
        daemon.request_shutdown()
