"""``python -m makima.agents.claude [--model=M] [--permission-mode=MODE] ...``: the agent
that ``makima start NAME --claude GOAL`` runs. The daemon starts it; it is not
meant to be run by hand (it speaks makima-agent/1 on its stdin and stdout)."""

from __future__ import annotations

import sys
from typing import NoReturn

from makima import logs, sdk
from makima.agents.claude.settings import ClaudeSettings, install_problem
from makima.errors import InvalidValueError


def _failing(reason: str) -> sdk.AgentMain:
    async def main(agent: sdk.Agent) -> None:
        await agent.fail(reason)

    return main


def main(argv: list[str] | None = None) -> NoReturn:
    logs.configure(stream=sys.stderr, json=True)
    try:
        settings = ClaudeSettings.from_argv(sys.argv[1:] if argv is None else argv)
    except InvalidValueError as exc:
        sdk.run(_failing(f"the Claude Code adapter's settings are invalid: {exc}"))
    problem = install_problem()
    if problem is not None:
        sdk.run(_failing(problem))
    try:
        from makima.agents.claude.adapter import Adapter
    except ImportError as exc:
        sdk.run(
            _failing(
                f"Claude Code cannot start ({exc}); install it with: pip install 'makima[claude]'"
            )
        )

    async def run(agent: sdk.Agent) -> None:
        await Adapter(agent, settings).run()

    sdk.run(run)


if __name__ == "__main__":
    main()
