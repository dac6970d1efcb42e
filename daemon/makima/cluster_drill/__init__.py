"""Cluster drill (``makima drill --daemons N``): several daemons on one PostgreSQL.

On a scratch directory it starts one embedded PostgreSQL and N daemons
(``python -m makima daemon``, each with its own state dir and socket, all on
that server, with a short lease), creates supervisors spread over them, each
running :mod:`makima.examples.drill_agent`, and answers every question as it
appears, through every daemon's socket in turn. Then, round after round, it
does to one daemon after another:

1. ``kill -9``: its supervisors must be taken over by the others (their agent
   restarted elsewhere with source ``task_reassignment``) within the TTL plus
   the renewal interval plus a few seconds; then it is started again (same
   state dir) and rejoins.
2. SIGSTOP past its TTL, then SIGCONT: its supervisors are taken over; its SDK
   agents must have stopped by themselves within the TTL (status 75, no ping),
   and once resumed the daemon, fenced, must not run them any more.
3. ``pg_terminate_backend`` of its lease connection: it reconnects and keeps
   its supervisors, or, had it missed its deadline, they are taken over
   cleanly.

Finally every supervisor is told to finish, the daemons are stopped with
SIGTERM, and the drill checks the agents' records (see
:mod:`makima.cluster_drill.checks`) against the database: no supervisor
acknowledged in two processes at once, nothing acknowledged lost, every answer
delivered once per process, every supervisor completed.

The parts, imports pointing one way (run -> scenarios, traffic, verify ->
processes, database, context -> settings -> checks):

- :mod:`~makima.cluster_drill.settings`: what is asked, the progress, the report;
- :mod:`~makima.cluster_drill.checks`: the judgements, pure;
- :mod:`~makima.cluster_drill.context`: the journal the parts share (what was
  created, finished, answered; notes; problems found on the way);
- :mod:`~makima.cluster_drill.database`: the shared server and the drill's queries;
- :mod:`~makima.cluster_drill.processes`: the daemons, the agents' records, /proc;
- :mod:`~makima.cluster_drill.traffic`: supervisors created, events, answers;
- :mod:`~makima.cluster_drill.scenarios`: kill, pause, terminate, takeover times;
- :mod:`~makima.cluster_drill.verify`: the final checks;
- :mod:`~makima.cluster_drill.run`: :func:`run_cluster_drill`, all of it in order.
"""

from makima.cluster_drill.database import database_url
from makima.cluster_drill.run import run_cluster_drill
from makima.cluster_drill.settings import (
    ClusterProgress,
    ClusterReport,
    ClusterSettings,
    Takeover,
    TakeoverRow,
)

__all__ = [
    "ClusterProgress",
    "ClusterReport",
    "ClusterSettings",
    "Takeover",
    "TakeoverRow",
    "database_url",
    "run_cluster_drill",
]
