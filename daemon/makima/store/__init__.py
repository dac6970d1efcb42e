"""The store: the one door to the database for the rest of makima (DESIGN §2).

``manager`` is the store itself (one method per save point and per read, the
only importer of makima.repository); ``commands`` are the typed save points;
``committer`` is the group commit.
"""

from makima.store.commands import (
    AnswersDelivered,
    CheckpointSaved,
    DaemonRegistered,
    DaemonSeen,
    Heartbeat,
    Heartbeats,
    MessageAdded,
    PhaseChange,
    QuestionAnswered,
    QuestionAsked,
    QuestionRowsRepaired,
    QuestionsRedelivered,
    RestorationsCounted,
    StateChange,
    StateRestored,
    StatesRestored,
    SupervisorCreated,
    TaskFinished,
    TasksEnded,
    TaskSpawned,
    TasksRequeued,
    TaskStarted,
)
from makima.store.committer import Committer, CommitterStats
from makima.store.manager import Store

__all__ = [
    "AnswersDelivered",
    "CheckpointSaved",
    "Committer",
    "CommitterStats",
    "DaemonRegistered",
    "DaemonSeen",
    "Heartbeat",
    "Heartbeats",
    "MessageAdded",
    "PhaseChange",
    "QuestionAnswered",
    "QuestionAsked",
    "QuestionRowsRepaired",
    "QuestionsRedelivered",
    "RestorationsCounted",
    "StateChange",
    "StateRestored",
    "StatesRestored",
    "Store",
    "SupervisorCreated",
    "TaskFinished",
    "TaskSpawned",
    "TaskStarted",
    "TasksEnded",
    "TasksRequeued",
]
