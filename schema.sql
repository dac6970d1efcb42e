-- makima database schema: the one source of truth.
--
-- Applied at every daemon start, inside one transaction under an advisory
-- lock. Idempotent: every statement is CREATE ... IF NOT EXISTS, ADD COLUMN
-- IF NOT EXISTS or a guarded DO block, so applying it twice changes nothing,
-- and applying it over an older database adds what is missing while rows
-- keep their data (new columns take their defaults).
--
-- Tables are created with their keys only and every other column is added
-- by ALTER TABLE, so a new database and an upgraded one end up identical.

-- ---------------------------------------------------------------- version
CREATE TABLE IF NOT EXISTS makima_schema (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton)
);
ALTER TABLE makima_schema ADD COLUMN IF NOT EXISTS version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE makima_schema ADD COLUMN IF NOT EXISTS applied_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE makima_schema ADD COLUMN IF NOT EXISTS checksum TEXT;
COMMENT ON TABLE makima_schema IS 'One row: the version of schema.sql last applied to this database';
COMMENT ON COLUMN makima_schema.singleton IS 'Always true: keeps the table to a single row';
COMMENT ON COLUMN makima_schema.version IS 'Schema version written by the makima that last applied schema.sql';
COMMENT ON COLUMN makima_schema.applied_at IS 'When that version was first applied';
COMMENT ON COLUMN makima_schema.checksum IS 'SHA-256 of the schema.sql last applied: a daemon starting over the same one applies nothing';

-- ---------------------------------------------------------------- daemons
CREATE TABLE IF NOT EXISTS daemons (
    daemon_id UUID PRIMARY KEY
);
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS host TEXT NOT NULL DEFAULT '';
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS pid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS started_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now();
COMMENT ON TABLE daemons IS 'Every makima daemon that has run against this database';
COMMENT ON COLUMN daemons.daemon_id IS 'Identity a daemon picks at start';
COMMENT ON COLUMN daemons.host IS 'Host name the daemon runs on';
COMMENT ON COLUMN daemons.pid IS 'Process id of the daemon on its host';
COMMENT ON COLUMN daemons.started_at IS 'When the daemon registered (database clock)';
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS lease_ttl_s DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE daemons ADD COLUMN IF NOT EXISTS released_at TIMESTAMPTZ;
COMMENT ON COLUMN daemons.last_seen_at IS 'Last heartbeat of the daemon (database clock)';
COMMENT ON COLUMN daemons.lease_expires_at IS 'Until when the daemon holds its supervisors (database clock); past it, any daemon may claim them';
COMMENT ON COLUMN daemons.lease_ttl_s IS 'The lease TTL the daemon renews with, in seconds';
COMMENT ON COLUMN daemons.released_at IS 'When the daemon let go of its lease on purpose (a handover at shutdown); NULL while it runs';

-- ---------------------------------------------------------------- supervisors (the spec)
CREATE TABLE IF NOT EXISTS supervisors (
    supervisor_id UUID PRIMARY KEY
);
ALTER TABLE supervisors ADD COLUMN IF NOT EXISTS name TEXT NOT NULL DEFAULT '';
ALTER TABLE supervisors ADD COLUMN IF NOT EXISTS goal TEXT NOT NULL DEFAULT '';
ALTER TABLE supervisors ADD COLUMN IF NOT EXISTS agent_command TEXT[] NOT NULL DEFAULT ARRAY[]::TEXT[];
ALTER TABLE supervisors ADD COLUMN IF NOT EXISTS cwd TEXT;
ALTER TABLE supervisors ADD COLUMN IF NOT EXISTS env JSONB NOT NULL DEFAULT '{}';
ALTER TABLE supervisors ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();
COMMENT ON TABLE supervisors IS 'What each supervisor is: written once when it is created';
COMMENT ON COLUMN supervisors.supervisor_id IS 'Identity of the supervisor';
COMMENT ON COLUMN supervisors.name IS 'Short human name of the supervisor';
COMMENT ON COLUMN supervisors.goal IS 'What the agent is asked to achieve';
COMMENT ON COLUMN supervisors.agent_command IS 'Program and arguments of the agent process (never run through a shell)';
COMMENT ON COLUMN supervisors.cwd IS 'Working directory of the agent, or NULL for the daemon''s';
COMMENT ON COLUMN supervisors.env IS 'Extra environment variables for the agent: an object of strings';
COMMENT ON COLUMN supervisors.created_at IS 'When the supervisor was created';

-- ---------------------------------------------------------------- supervisor_states
CREATE TABLE IF NOT EXISTS supervisor_states (
    supervisor_id UUID PRIMARY KEY REFERENCES supervisors (supervisor_id) ON DELETE CASCADE
);
-- The seed migration's columns, types, defaults and constraints.
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS state VARCHAR(50) NOT NULL DEFAULT 'initializing';
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS current_activity TEXT;
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS progress INTEGER DEFAULT 0
        CHECK (progress >= 0 AND progress <= 100);
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS error_message TEXT;
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS spawned_task_ids UUID[] DEFAULT ARRAY[]::UUID[];
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS pending_questions JSONB DEFAULT '[]';
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS restoration_count INTEGER DEFAULT 0;
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS last_restored_at TIMESTAMPTZ;
ALTER TABLE supervisor_states
    ADD COLUMN IF NOT EXISTS restoration_source VARCHAR(50);
-- makima's own columns.
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS phase TEXT;
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS checkpoint_data JSONB;
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS last_heartbeat TIMESTAMPTZ;
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS owner_daemon_id UUID;
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS lease_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE supervisor_states ADD COLUMN IF NOT EXISTS result JSONB;

DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'supervisor_states'::regclass AND conname = 'supervisor_states_state_known'
    ) THEN
        ALTER TABLE supervisor_states ADD CONSTRAINT supervisor_states_state_known CHECK (
            state IN ('initializing', 'idle', 'working', 'waiting_for_user', 'waiting_for_tasks',
                      'blocked', 'completed', 'failed', 'interrupted'));
    END IF;
    -- A state table made before the spec table existed gains the foreign key
    -- without checking old rows (NOT VALID); new rows are checked.
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'supervisor_states'::regclass AND contype = 'f'
    ) THEN
        ALTER TABLE supervisor_states ADD CONSTRAINT supervisor_states_supervisor_id_fkey
            FOREIGN KEY (supervisor_id) REFERENCES supervisors (supervisor_id)
            ON DELETE CASCADE NOT VALID;
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS idx_supervisor_states_state ON supervisor_states(state);
CREATE INDEX IF NOT EXISTS idx_supervisor_states_pending_questions
    ON supervisor_states USING gin(pending_questions)
    WHERE pending_questions != '[]'::jsonb;

COMMENT ON TABLE supervisor_states IS 'Mutable state of each supervisor, written at every save point';
COMMENT ON COLUMN supervisor_states.supervisor_id IS 'The supervisor this state belongs to';
COMMENT ON COLUMN supervisor_states.state IS 'Where the supervisor stands: initializing, idle, working, waiting_for_user, waiting_for_tasks, blocked, completed, failed or interrupted';
COMMENT ON COLUMN supervisor_states.current_activity IS 'What the agent says it is doing now, in words for a person';
COMMENT ON COLUMN supervisor_states.progress IS 'How far along the agent says it is, as a percentage from 0 to 100';
COMMENT ON COLUMN supervisor_states.error_message IS 'Why the supervisor failed, is blocked or was interrupted';
COMMENT ON COLUMN supervisor_states.spawned_task_ids IS 'Ids of every task this supervisor has spawned (rows of tasks)';
COMMENT ON COLUMN supervisor_states.pending_questions IS 'Questions still waiting for a person: a JSON array of {id, question, choices, context, asked_at}';
COMMENT ON COLUMN supervisor_states.restoration_count IS 'How many times the supervisor has been brought back after an interruption';
COMMENT ON COLUMN supervisor_states.last_restored_at IS 'When the supervisor was last brought back';
COMMENT ON COLUMN supervisor_states.restoration_source IS 'What brought it back last: daemon_restart, task_reassignment, manual or agent_restart';
COMMENT ON COLUMN supervisor_states.phase IS 'The phase the agent last announced';
COMMENT ON COLUMN supervisor_states.checkpoint_data IS 'The agent''s own resumable data, as it last sent it';
COMMENT ON COLUMN supervisor_states.last_heartbeat IS 'Last time the daemon confirmed the supervisor alive (database clock)';
COMMENT ON COLUMN supervisor_states.version IS 'Bumped by one at every save point';
COMMENT ON COLUMN supervisor_states.result IS 'What the agent finished with (the result of done); null before';
COMMENT ON COLUMN supervisor_states.owner_daemon_id IS 'The daemon that runs this supervisor now, if any';
COMMENT ON COLUMN supervisor_states.lease_epoch IS 'Bumped at every change of owner; writes check it to fence out a former owner';
COMMENT ON COLUMN supervisor_states.created_at IS 'When the state row was created';
COMMENT ON COLUMN supervisor_states.updated_at IS 'When the state row was last written';

-- ---------------------------------------------------------------- tasks
CREATE TABLE IF NOT EXISTS tasks (
    task_id UUID PRIMARY KEY
);
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS supervisor_id UUID NOT NULL
    REFERENCES supervisors (supervisor_id) ON DELETE CASCADE;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS name TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS command TEXT[] NOT NULL DEFAULT ARRAY[]::TEXT[];
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS cwd TEXT;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS env JSONB NOT NULL DEFAULT '{}';
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS status VARCHAR(20) NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted'));
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS exit_code INTEGER;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS output_tail TEXT;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS started_at TIMESTAMPTZ;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS finished_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS idx_tasks_supervisor ON tasks(supervisor_id);
COMMENT ON TABLE tasks IS 'Child commands spawned by supervisors; a row exists before its process starts';
COMMENT ON COLUMN tasks.task_id IS 'Identity of the task';
COMMENT ON COLUMN tasks.supervisor_id IS 'The supervisor that spawned it';
COMMENT ON COLUMN tasks.name IS 'Short name the agent gave the task';
COMMENT ON COLUMN tasks.command IS 'Program and arguments (never run through a shell)';
COMMENT ON COLUMN tasks.cwd IS 'Working directory, or NULL for the agent''s';
COMMENT ON COLUMN tasks.env IS 'Extra environment variables: an object of strings';
COMMENT ON COLUMN tasks.status IS 'pending, running, succeeded, failed, cancelled or interrupted';
COMMENT ON COLUMN tasks.exit_code IS 'Exit status of the last attempt (negative: killed by that signal)';
COMMENT ON COLUMN tasks.output_tail IS 'The last lines the task printed';
COMMENT ON COLUMN tasks.attempts IS 'How many times the process was started';
COMMENT ON COLUMN tasks.created_at IS 'When the task was recorded';
COMMENT ON COLUMN tasks.started_at IS 'When its last attempt started';
COMMENT ON COLUMN tasks.finished_at IS 'When it reached a final status';

-- ---------------------------------------------------------------- supervisor_messages
CREATE TABLE IF NOT EXISTS supervisor_messages (
    supervisor_id UUID NOT NULL REFERENCES supervisors (supervisor_id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    PRIMARY KEY (supervisor_id, seq)
);
ALTER TABLE supervisor_messages ADD COLUMN IF NOT EXISTS role TEXT NOT NULL DEFAULT 'agent';
ALTER TABLE supervisor_messages ADD COLUMN IF NOT EXISTS content JSONB NOT NULL DEFAULT 'null';
ALTER TABLE supervisor_messages ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();
COMMENT ON TABLE supervisor_messages IS 'Conversation history of each supervisor, append-only';
COMMENT ON COLUMN supervisor_messages.supervisor_id IS 'The supervisor the message belongs to';
COMMENT ON COLUMN supervisor_messages.seq IS 'Position in the conversation, from 1';
COMMENT ON COLUMN supervisor_messages.role IS 'Who spoke: user, assistant, system, tool, ...';
COMMENT ON COLUMN supervisor_messages.content IS 'What was said, as the agent sent it';
COMMENT ON COLUMN supervisor_messages.created_at IS 'When the message was recorded';

-- ---------------------------------------------------------------- supervisor_checkpoints
CREATE TABLE IF NOT EXISTS supervisor_checkpoints (
    supervisor_id UUID NOT NULL REFERENCES supervisors (supervisor_id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    PRIMARY KEY (supervisor_id, seq)
);
ALTER TABLE supervisor_checkpoints ADD COLUMN IF NOT EXISTS snapshot JSONB NOT NULL DEFAULT '{}';
ALTER TABLE supervisor_checkpoints ADD COLUMN IF NOT EXISTS reason TEXT NOT NULL DEFAULT 'explicit';
ALTER TABLE supervisor_checkpoints ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();
COMMENT ON TABLE supervisor_checkpoints IS 'Full snapshots of supervisor states, to revert to when the current one is invalid';
COMMENT ON COLUMN supervisor_checkpoints.supervisor_id IS 'The supervisor the snapshot belongs to';
COMMENT ON COLUMN supervisor_checkpoints.seq IS 'Order of the snapshot, from 1';
COMMENT ON COLUMN supervisor_checkpoints.snapshot IS 'The whole supervisor state as JSON';
COMMENT ON COLUMN supervisor_checkpoints.reason IS 'Why it was taken: phase_change, explicit, ...';
COMMENT ON COLUMN supervisor_checkpoints.created_at IS 'When it was taken';

-- ---------------------------------------------------------------- questions
CREATE TABLE IF NOT EXISTS questions (
    question_id UUID PRIMARY KEY
);
ALTER TABLE questions ADD COLUMN IF NOT EXISTS supervisor_id UUID NOT NULL
    REFERENCES supervisors (supervisor_id) ON DELETE CASCADE;
ALTER TABLE questions ADD COLUMN IF NOT EXISTS question TEXT NOT NULL DEFAULT '';
ALTER TABLE questions ADD COLUMN IF NOT EXISTS choices JSONB NOT NULL DEFAULT '[]';
ALTER TABLE questions ADD COLUMN IF NOT EXISTS context TEXT;
ALTER TABLE questions ADD COLUMN IF NOT EXISTS asked_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE questions ADD COLUMN IF NOT EXISTS answer TEXT;
ALTER TABLE questions ADD COLUMN IF NOT EXISTS answered_at TIMESTAMPTZ;
ALTER TABLE questions ADD COLUMN IF NOT EXISTS answered_by_uid INTEGER;
ALTER TABLE questions ADD COLUMN IF NOT EXISTS delivered_at TIMESTAMPTZ;
ALTER TABLE questions ADD COLUMN IF NOT EXISTS redelivery_count INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS idx_questions_supervisor ON questions(supervisor_id);
CREATE INDEX IF NOT EXISTS idx_questions_open ON questions(supervisor_id) WHERE answer IS NULL;
CREATE INDEX IF NOT EXISTS idx_questions_undelivered ON questions(supervisor_id)
    WHERE answer IS NOT NULL AND delivered_at IS NULL;
COMMENT ON TABLE questions IS 'Every question ever asked, with its one answer: for exactly-once answers and audit';
COMMENT ON COLUMN questions.question_id IS 'Identity of the question (the id in pending_questions)';
COMMENT ON COLUMN questions.supervisor_id IS 'The supervisor whose agent asked it';
COMMENT ON COLUMN questions.question IS 'The question as the agent put it';
COMMENT ON COLUMN questions.choices IS 'Allowed answers as a JSON array of strings; empty means free text';
COMMENT ON COLUMN questions.context IS 'Background the agent gave for the person answering';
COMMENT ON COLUMN questions.asked_at IS 'When it was asked';
COMMENT ON COLUMN questions.answer IS 'The answer, once given; never overwritten';
COMMENT ON COLUMN questions.answered_at IS 'When it was answered';
COMMENT ON COLUMN questions.answered_by_uid IS 'Unix uid of the socket peer that answered';
COMMENT ON COLUMN questions.delivered_at IS 'When the agent received the answer';
COMMENT ON COLUMN questions.redelivery_count IS 'How many times the open question was delivered again after a restoration';

-- ---------------------------------------------------------------- supervisor_requests
CREATE TABLE IF NOT EXISTS supervisor_requests (
    request_id UUID PRIMARY KEY
);
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS supervisor_id UUID NOT NULL
    REFERENCES supervisors (supervisor_id) ON DELETE CASCADE;
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS kind TEXT NOT NULL DEFAULT 'cancel'
    CHECK (kind IN ('cancel', 'resume'));
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS requested_by_uid INTEGER;
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS requested_by_daemon UUID;
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS requested_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS handled_at TIMESTAMPTZ;
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS handled_by UUID;
ALTER TABLE supervisor_requests ADD COLUMN IF NOT EXISTS outcome JSONB;
CREATE INDEX IF NOT EXISTS idx_supervisor_requests_open ON supervisor_requests(supervisor_id)
    WHERE handled_at IS NULL;
COMMENT ON TABLE supervisor_requests IS 'A person''s cancel or resume given on one daemon for a supervisor another daemon runs: the owner carries it out';
COMMENT ON COLUMN supervisor_requests.request_id IS 'Identity of the request';
COMMENT ON COLUMN supervisor_requests.supervisor_id IS 'The supervisor it is for';
COMMENT ON COLUMN supervisor_requests.kind IS 'cancel or resume';
COMMENT ON COLUMN supervisor_requests.requested_by_uid IS 'Unix uid of the socket peer that asked';
COMMENT ON COLUMN supervisor_requests.requested_by_daemon IS 'The daemon whose socket took the request';
COMMENT ON COLUMN supervisor_requests.requested_at IS 'When it was asked';
COMMENT ON COLUMN supervisor_requests.handled_at IS 'When the owning daemon carried it out; NULL until then';
COMMENT ON COLUMN supervisor_requests.handled_by IS 'The daemon that carried it out';
COMMENT ON COLUMN supervisor_requests.outcome IS 'What came of it, as the control method would have replied ({state} or an error)';

CREATE INDEX IF NOT EXISTS idx_supervisor_states_owner ON supervisor_states(owner_daemon_id)
    WHERE state NOT IN ('completed', 'failed');

-- ---------------------------------------------------------------- version row
INSERT INTO makima_schema (singleton, version) VALUES (TRUE, 2)
ON CONFLICT (singleton) DO UPDATE
    SET version = EXCLUDED.version, applied_at = now()
    WHERE makima_schema.version < EXCLUDED.version;
