"""PostgreSQL restarts in the middle of a run: the daemon reconnects, save
points wait rather than vanish, people's calls get -32005 meanwhile, and
nothing acknowledged is lost."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from makima import repository as repo
from makima.control.client import RemoteError
from makima.database import ensure_database
from makima.embedded import EmbeddedPostgres
from tests.harness import Relay, client_for, daemon_config, running_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.drill]


async def test_postgres_restart_mid_run(short_tmp: Path, relay: Relay) -> None:
    server = EmbeddedPostgres(short_tmp / f"pgr{uuid.uuid4().hex[:4]}")
    params = await anyio.to_thread.run_sync(server.start)
    try:
        await ensure_database(params)
        config = daemon_config(params, short_tmp)
        async with running_daemon(config) as daemon, client_for(daemon) as client:
            created = await client.call(
                "supervisor.create", {"name": "pg", "command": relay.command}
            )
            sid = uuid.UUID(created["supervisor_id"])
            agent = await relay.accept()
            await agent.expect("start")
            qid = (await agent.request({"type": "ask", "question": "Still?", "choices": ["yes"]}))[
                "question_id"
            ]

            await anyio.to_thread.run_sync(server.stop)  # PostgreSQL goes away
            await agent.send({"type": "phase", "phase": "during-outage", "ref": "p"})
            with pytest.raises(RemoteError) as unavailable:
                await client.call("daemon.status")
            assert unavailable.value.code == -32005
            with pytest.raises(RemoteError) as unavailable:
                await client.call("question.answer", {"question_id": qid, "answer": "yes"})
            assert unavailable.value.code == -32005

            await anyio.to_thread.run_sync(server.start)  # and comes back
            ack = await agent.receive()  # the save point waited, then committed
            assert ack == {"type": "ack", "ref": "p"}
            state = await repo.get_supervisor_state_for_restoration(daemon.db.pool, sid)
            assert state is not None and state.phase == "during-outage"
            assert [str(q.id) for q in state.pending_questions] == [qid]

            await client.call("question.answer", {"question_id": qid, "answer": "yes"})
            assert (await agent.expect("answer"))["answer"] == "yes"
            await agent.request({"type": "done"})
            body = await client.call("supervisor.get", {"supervisor_id": str(sid)})
            assert body["state"] == "completed" and body["phase"] == "during-outage"
            status = await client.call("daemon.status")
            assert status["pending_questions"] == 0
    finally:
        await anyio.to_thread.run_sync(server.stop)
