"""Claude Code under makima: ``makima start NAME --claude GOAL``.

- :mod:`.settings` (pure, imported by the daemon and the CLI): the options of
  ``--claude``, the agent command they become, and the checks made before a
  supervisor is created (the extra installed, credentials present).
- :mod:`.prompts` (pure): every text makima shows Claude or a person.
- :mod:`.outcome` (pure): what a finished Claude Code turn means for the
  supervisor (done, failed, blocked).
- :mod:`.bridge`: makima's tools and permission prompts, on top of
  :class:`makima.sdk.Agent`, with exactly-once delivery of restored answers.
- :mod:`.adapter`: drives the Claude Agent SDK: sessions, resume and fallback,
  the conversation written as history.

Only :mod:`.adapter`, :mod:`.bridge` and ``__main__`` import ``claude_agent_sdk``.
"""
