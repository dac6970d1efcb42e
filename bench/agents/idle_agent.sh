#!/bin/sh
# The lightest agent that speaks makima-agent/1, for bench/restoration.py.
#
#     sh idle_agent.sh STARTED [ask]
#
# Reads the daemon's first line (the start message), then appends its
# supervisor id to STARTED (a FIFO the bench reads; a line this short is
# written atomically), then, with "ask", asks one question. Then it reads
# stdin until the daemon closes it (its acks, answers and the cancel) and
# exits: one small process per agent, no interpreter. Its stdout stays open
# (as fd 3 of cat): an agent that closes stdout is taken for one that is ending.
set -eu
IFS= read -r start || exit 3
case "$start" in
    *'"type":"start"'* | *'"type": "start"'*) ;;
    *) echo "idle_agent: the first line is not a start message" >&2; exit 3 ;;
esac
echo "$MAKIMA_SUPERVISOR_ID" >>"$1"
if [ "${2:-}" = ask ]; then
    echo '{"type":"ask","ref":"q","question":"Deploy build 42 to staging?","choices":["yes","no"],"context":"The tests passed on the last commit."}'
fi
exec cat 3>&1 >/dev/null
