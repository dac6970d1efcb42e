"""Agents that ship with makima: adapters that run a real AI agent under a supervisor.

Each adapter is a program the daemon starts as a supervisor's agent
(``python -m makima.agents.<name>``). It speaks makima-agent/1 through
:mod:`makima.sdk` on one side and drives its agent on the other. The daemon
imports only an adapter's pure settings module, never the agent's client.
"""
