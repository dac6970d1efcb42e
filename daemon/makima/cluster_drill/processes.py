"""The cluster's processes: the daemons (started, called, stopped) and the agents
(their record files, and /proc)."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

import makima.cluster_drill.checks as cc
from makima.cluster_drill.context import Journal, until
from makima.cluster_drill.settings import ClusterSettings
from makima.control.client import ControlClient, ControlError, RemoteError
from makima.drill import DaemonRunner, DrillError

log = structlog.get_logger("makima.cluster_drill")

INTERNAL_ERROR = -32603


def wall_time(seconds: float) -> str:
    """A moment as the daemons' logs show it (UTC, ISO 8601), to find it there."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def proc_state(pid: int) -> cc.ProcState | None:
    """The process as /proc shows it; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return cc.ProcState("?", None)
    return cc.parse_proc_stat(text)


def is_running(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and not state.ended


class RecordBook:
    """The agents' record files, read as they grow."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: list[cc.Record] = []
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> list[cc.Record]:
        for path in sorted(self.directory.glob("*.jsonl")):
            if path.name.startswith("trace-"):
                continue
            offset = self._offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # a torn last line waits for its end
            if end:
                lines = data[:end].decode(errors="replace").splitlines()
                self.records.extend(cc.parse_records(lines))
                self._offsets[path] = offset + end
        return self.records

    def deliveries(self) -> list[cc.Delivery]:
        found: list[cc.Delivery] = []
        for path in sorted(self.directory.glob("trace-*.jsonl")):
            sid, _, pid = path.stem.removeprefix("trace-").rpartition("-")
            if not pid.isdigit():
                continue
            lines = path.read_text(errors="replace").splitlines()
            found += cc.deliveries_from_trace(sid, int(pid), lines)
        return found

    def live_agents(self, supervisor_ids: Sequence[str], on: int | None) -> dict[int, str]:
        """pid -> supervisor id of the agent processes of these supervisors that run
        under daemon pid ``on`` and have not ended."""
        wanted = set(supervisor_ids)
        found: dict[int, str] = {}
        for sid, listed in cc.processes(self.refresh()).items():
            if sid not in wanted:
                continue
            for process in listed:
                if process.ppid == on and process.exited is None and is_running(process.pid):
                    found[process.pid] = sid
        return found


class Member:
    """One daemon of the cluster: its runner, identity and whether the drill may call it."""

    def __init__(self, index: int, runner: DaemonRunner) -> None:
        self.index = index
        self.runner = runner
        self.daemon_id: str | None = None
        self.pid: int | None = None
        self.client: ControlClient | None = None
        self.available = False
        self.back = anyio.Event()
        self.answers = 0
        self.paused = False

    @property
    def name(self) -> str:
        return f"d{self.index}"

    def up(self) -> None:
        self.available = True
        self.back.set()

    def down(self) -> None:
        self.available = False
        if self.back.is_set():
            self.back = anyio.Event()


class Cluster:
    """The daemons on the scratch directory, the agents' records, and every control
    call the drill makes (counted; internal errors kept for the report)."""

    def __init__(self, settings: ClusterSettings, scratch: Path, journal: Journal) -> None:
        self.settings = settings
        self.scratch = scratch
        self.journal = journal
        self.records_dir = scratch / "records"
        self.records_dir.mkdir(exist_ok=True)
        self.records_dir.chmod(0o777)  # agents may run as another user than the drill
        self.book = RecordBook(self.records_dir)
        self.members = [
            Member(
                i,
                DaemonRunner(
                    state_dir=scratch / f"d{i}",
                    # In its state dir: the runner names its notification socket
                    # after the control socket's folder, one per daemon.
                    socket_path=scratch / f"d{i}" / "d.sock",
                    database_url=None,  # set once the server runs
                    log_path=scratch / f"d{i}" / "daemon.log",
                ),
            )
            for i in range(settings.daemons)
        ]
        for member in self.members:
            member.runner.state_dir.mkdir(mode=0o700, exist_ok=True)
        self.statuses: dict[int, dict[str, Any]] = {}
        self.stop_codes: dict[int, int] = {}
        self.calls = 0  # control calls made
        self.internal_errors: list[str] = []  # calls answered with -32603

    def use_database(self, url: str) -> None:
        for member in self.members:
            member.runner.database_url = url

    def _lease_env(self) -> dict[str, str]:
        return {
            "MAKIMA_LEASE_TTL": str(self.settings.lease_ttl),
            "MAKIMA_LEASE_RENEW": str(self.settings.lease_renew),
        }

    async def call(
        self, member: Member, client: ControlClient, method: str, params: Any = None
    ) -> Any:
        """``client.call``, counted; an internal error (-32603) is a finding, kept for
        the report, and raised like any other."""
        self.calls += 1
        try:
            return await client.call(method, params)
        except RemoteError as exc:
            if exc.code == INTERNAL_ERROR:
                self.internal_errors.append(f"{member.name} {method}: {exc}")
                log.warning("cluster_drill.internal_error", daemon=member.name, method=method)
            raise

    async def status(self, member: Member, client: ControlClient) -> dict[str, Any]:
        """``daemon.status``, tried again after an internal error (reported anyway)."""
        for _ in range(3):
            try:
                status: dict[str, Any] = await self.call(member, client, "daemon.status")
            except RemoteError as exc:
                if exc.code != INTERNAL_ERROR:
                    raise
                await anyio.sleep(0.5)
            else:
                return status
        last: dict[str, Any] = await self.call(member, client, "daemon.status")
        return last

    async def start_member(self, member: Member) -> None:
        await member.runner.start(self._lease_env())
        assert member.runner.process is not None
        member.pid = member.runner.process.pid
        member.paused = False
        async with ControlClient.connect(
            member.runner.socket_path, timeout=self.settings.call_timeout
        ) as client:
            member.daemon_id = (await self.call(member, client, "daemon.hello"))["daemon_id"]
            self.statuses[member.index] = await self.status(member, client)
        member.up()
        log.info(
            "cluster_drill.daemon_ready",
            daemon=member.name,
            daemon_id=member.daemon_id,
            pid=member.pid,
            start=member.runner.starts,
        )

    async def start_members(self) -> None:
        self.journal.tell(f"starting {len(self.members)} daemons")
        failures: list[Exception] = []

        async def start(member: Member) -> None:
            try:
                await self.start_member(member)
            except (DrillError, ControlError) as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(start, member)
        if failures:
            raise failures[0]
        await self.check_cluster_view("at start")

    def _view_problems(self, member: Member, status: Mapping[str, Any]) -> list[str]:
        """What is wrong with one daemon's view of the cluster (``daemon.status``)."""
        cluster = status.get("cluster")
        if not isinstance(cluster, dict):
            return [f"{member.name}: daemon.status has no 'cluster'"]
        problems: list[str] = []
        ids = {m.daemon_id for m in self.members}
        listed = {
            d.get("daemon_id")
            for d in cluster.get("daemons", [])
            if isinstance(d, dict) and d.get("alive")
        }
        if not ids <= listed:
            problems.append(f"{member.name} sees {len(ids & listed)}/{len(ids)} daemons alive")
        lease = cluster.get("lease") or {}
        asked = (self.settings.lease_ttl, self.settings.lease_renew, True)
        found = (lease.get("ttl"), lease.get("renew"), lease.get("enforced"))
        if found != asked:
            problems.append(f"{member.name}: lease ttl/renew/enforced {found} != {asked}")
        return problems

    async def check_cluster_view(self, when: str) -> None:
        """Every daemon's status lists every daemon alive, with the lease asked for
        (waiting a renewal or two for a daemon that just started to show)."""
        problems: dict[int, list[str]] = {}

        async def agreed() -> bool:
            for member in self.members:
                try:
                    with anyio.fail_after(self.settings.call_timeout):
                        async with ControlClient.connect(
                            member.runner.socket_path, timeout=self.settings.call_timeout
                        ) as client:
                            status = await self.status(member, client)
                except (ControlError, TimeoutError) as exc:
                    problems[member.index] = [f"{member.name}: daemon.status failed: {exc}"]
                    continue
                self.statuses[member.index] = status
                problems[member.index] = self._view_problems(member, status)
            return not any(problems.values())

        await until(agreed, 2 * (self.settings.lease_ttl + self.settings.lease_renew))
        found = [p for listed in problems.values() for p in listed]
        self.journal.judge(
            f"every daemon sees the whole cluster alive ({when})", found, len(self.members)
        )

    async def ensure_running(self, member: Member, why: str) -> None:
        """Start ``member`` again if its process is gone."""
        if member.runner.running:
            return
        code = member.runner.process.returncode if member.runner.process else None
        self.journal.note(f"{member.name} exited ({code}) {why}; starting it again")
        await member.runner.wait()
        await self.start_member(member)

    async def stop_members(self) -> None:
        self.journal.tell("stopping the daemons (SIGTERM)")
        for member in self.members:
            member.down()
            if member.runner.running:
                try:
                    self.stop_codes[member.index] = await member.runner.terminate()
                except TimeoutError:
                    self.stop_codes[member.index] = -1
                    await member.runner.kill()

    async def kill_members(self) -> None:
        """Whatever happened: no daemon left paused or running."""
        for member in self.members:
            if member.runner.running:
                if member.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(member.pid, signal.SIGCONT)
                with contextlib.suppress(Exception):
                    await member.runner.kill()
