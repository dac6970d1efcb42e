"""makima-control/1 on the daemon's socket: every method, every error code,
many clients, a slow subscriber, a peer of another uid."""

from __future__ import annotations

import json
import os
import pwd
import socket
import uuid
import warnings

import anyio
import pytest

from makima.control.client import ControlClient, RemoteError
from makima.daemon import Daemon
from makima.limits import QUESTION_LIMIT
from tests.harness import DEADLINE, Relay, client_for, next_event

pytestmark = pytest.mark.anyio


async def raw_exchange(path: str, data: bytes, lines: int = 1) -> list[dict[str, object]]:
    """Send raw bytes on a fresh connection and read ``lines`` replies."""
    with anyio.fail_after(DEADLINE):
        async with await anyio.connect_unix(path) as stream:
            await stream.send(data)
            buffer = b""
            out: list[dict[str, object]] = []
            while len(out) < lines:
                try:
                    buffer += await stream.receive()
                except anyio.EndOfStream:
                    break
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    out.append(json.loads(line))
            return out


async def test_hello_and_status(client: ControlClient, daemon: Daemon) -> None:
    hello = await client.call("daemon.hello")
    assert hello == {
        "protocol": "makima-control/1",
        "version": hello["version"],
        "daemon_id": str(daemon.daemon_id),
    }
    status = await client.call("daemon.status")
    assert status["pid"] == os.getpid()
    assert status["database"] == {"embedded": False}
    assert set(status["supervisors"]) >= {"working", "waiting_for_user", "completed"}
    assert status["pending_questions"] == 0
    assert status["last_startup_report"]["counts"]["restored"] == 0


async def test_error_codes(client: ControlClient, daemon: Daemon, relay: Relay) -> None:
    missing = str(uuid.uuid4())
    cases = [
        ("no.such.method", {}, -32601),
        ("supervisor.get", {}, -32602),
        ("supervisor.get", {"supervisor_id": "nope"}, -32602),
        ("supervisor.get", {"supervisor_id": missing}, -32001),
        ("supervisor.create", {"name": "x", "command": []}, -32602),
        ("supervisor.create", {"name": "x", "command": "ls"}, -32602),
        ("supervisor.create", {"name": "x", "command": ["ls"], "colour": "red"}, -32602),
        ("supervisor.list", {"all": "yes"}, -32602),
        ("supervisor.history", {"supervisor_id": missing, "limit": 0}, -32602),
        ("question.answer", {"question_id": missing, "answer": "x"}, -32001),
        ("question.answer", {"question_id": missing, "answer": ""}, -32602),
        ("events.subscribe", {"kinds": ["nope"]}, -32602),
        ("supervisor.cancel", {"supervisor_id": missing}, -32001),
        ("supervisor.resume", {"supervisor_id": missing}, -32001),
    ]
    for method, params, code in cases:
        with pytest.raises(RemoteError) as failure:
            await client.call(method, params)
        assert failure.value.code == code, (method, params, failure.value)
        assert str(failure.value)  # a message naming what was wrong

    # answered once; a second answer is a conflict carrying the first; a wrong choice is refused
    created = await client.call("supervisor.create", {"name": "q", "command": relay.command})
    agent = await relay.accept()
    await agent.expect("start")
    qid = (await agent.request({"type": "ask", "question": "Ship?", "choices": ["ship", "hold"]}))[
        "question_id"
    ]
    with pytest.raises(RemoteError) as wrong:
        await client.call("question.answer", {"question_id": qid, "answer": "maybe"})
    assert wrong.value.code == -32003 and wrong.value.data == {"choices": ["ship", "hold"]}
    await client.call("question.answer", {"question_id": qid, "answer": "hold"})
    with pytest.raises(RemoteError) as again:
        await client.call("question.answer", {"question_id": qid, "answer": "ship"})
    assert again.value.code == -32002 and again.value.data["answer"] == "hold"
    assert (await agent.expect("answer"))["answer"] == "hold"  # delivered once
    await agent.request({"type": "done"})
    with anyio.fail_after(DEADLINE):
        while await agent.receive() is not None:
            pass
    with pytest.raises(RemoteError) as finished:
        await client.call("supervisor.cancel", {"supervisor_id": created["supervisor_id"]})
    assert finished.value.code == -32002


async def test_bad_json_keeps_the_connection_and_long_lines_close_it(daemon: Daemon) -> None:
    path = str(daemon.config.socket_path)
    replies = await raw_exchange(
        path,
        b'{not json\n{"jsonrpc": "2.0", "id": 7, "method": "daemon.hello"}\n',
        lines=2,
    )
    assert replies[0]["error"]["code"] == -32700  # type: ignore[index]
    assert replies[1]["id"] == 7 and replies[1]["result"]["protocol"] == "makima-control/1"  # type: ignore[index]
    replies = await raw_exchange(path, b"[1,2]\n", lines=1)
    assert replies[0]["error"]["code"] == -32600  # type: ignore[index]
    replies = await raw_exchange(path, b"x" * (1024 * 1024 + 2), lines=2)
    assert len(replies) == 1 and replies[0]["error"]["code"] == -32600  # type: ignore[index]
    # and the daemon still answers
    async with client_for(daemon) as c:
        assert (await c.call("daemon.hello"))["protocol"] == "makima-control/1"


async def test_hundred_concurrent_clients(daemon: Daemon) -> None:
    results: list[str] = []

    async def one(n: int) -> None:
        async with client_for(daemon) as c:
            hello = await c.call("daemon.hello")
            created = (
                await c.call("supervisor.create", {"name": f"c{n}", "command": ["true"]})
                if n % 10 == 0
                else None
            )
            await c.call("supervisor.list", {"all": True})
            results.append(hello["daemon_id"] if created is None else created["supervisor_id"])

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(one, n)
    assert len(results) == 100


async def test_slow_subscriber_is_dropped_and_the_daemon_carries_on(
    daemon: Daemon, relay: Relay
) -> None:
    path = str(daemon.config.socket_path)
    with anyio.fail_after(120):
        async with await anyio.connect_unix(path) as slow, client_for(daemon) as c:
            await slow.send(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
            # ... and never reads again. Big events fill its socket, then its buffer.
            async with c.events(["question.asked"]) as events:
                await c.call("supervisor.create", {"name": "noisy", "command": relay.command})
                agent = await relay.accept()
                await agent.expect("start")
                # each question within the agent protocol's limit, and answered, so
                # that the open ones stay within theirs (makima.limits)
                big = "q" * (QUESTION_LIMIT - 4096)
                for n in range(int(daemon.bus.buffer) + 60):
                    asked = await agent.request({"type": "ask", "question": f"{n} {big}"})
                    await c.call(
                        "question.answer", {"question_id": asked["question_id"], "answer": "ok"}
                    )
                    await agent.expect("answer")
                    if daemon.bus.subscriber_count < 2:
                        break
                # the fast subscriber saw the latest question; the slow one was dropped
                await next_event(events, "question.asked")
                assert daemon.bus.subscriber_count == 1
                assert (await c.call("daemon.hello"))["protocol"] == "makima-control/1"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
async def test_peer_of_another_uid_is_refused(daemon: Daemon) -> None:
    path = str(daemon.config.socket_path)
    os.chmod(path, 0o666)  # let the OS pass it through, so SO_PEERCRED decides
    nobody = pwd.getpwnam("nobody")

    def probe() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 9
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(20)
                s.connect(path)
                data = b""
                while b"\n" not in data:  # the daemon says why at once...
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                reply = json.loads(data.split(b"\n")[0])
                code = 0 if reply["error"]["code"] == -32004 else 1
                # ...and a request sent after reading it still goes out (no EPIPE);
                # the daemon hangs up once this side is done.
                s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.hello"}\n')
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        return os.waitpid(pid, 0)[1]

    status = await anyio.to_thread.run_sync(probe)
    assert os.WEXITSTATUS(status) == 0
    async with client_for(daemon) as c:  # root still gets in
        assert (await c.call("daemon.hello"))["protocol"] == "makima-control/1"
