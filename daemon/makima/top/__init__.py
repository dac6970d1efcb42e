"""``makima top``: a live view of the supervisors and their open questions.

One owner per concern: :mod:`~makima.top.model` (what is known, the selection,
what a key does; pure), :mod:`~makima.top.keys` (bytes typed into key names;
pure), :mod:`~makima.top.render` (rich renderables for a width and a height;
pure), :mod:`~makima.top.terminal` (the terminal's mode and its input),
:mod:`~makima.top.app` (the socket loop, the screen) and
:mod:`~makima.top.command` (the click command).
"""
