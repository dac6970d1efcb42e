"""A test agent that never reads its stdin: it writes ref'd lines until the daemon's
acks fill its stdin pipe and the daemon's own write buffer, then sleeps. It ignores
SIGTERM, so only a SIGKILL of its process group stops it.

    python deaf_agent.py PID_FILE

Writes its pid to PID_FILE, then "full" on a second line once its stdin pipe holds
60,000 bytes or more (the daemon is then about to block writing to it).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import sys
import termios
import time


def pending_input() -> int:
    raw = fcntl.ioctl(0, termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


def report_full_when(full: bool, state: dict[str, int | None], n: int) -> None:
    if full and state["full_at"] is None:
        state["full_at"] = n
        with open(sys.argv[1], "a") as handle:
            handle.write("full\n")


def main() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(sys.argv[1], "w") as handle:
        handle.write(f"{os.getpid()}\n")
    # Our own writes must not block: a daemon that stops reading us while its ack
    # waits for room in our stdin would leave us stuck before we could look.
    os.set_blocking(1, False)
    ref = "r" * 200  # big acks fill the pipe sooner
    state: dict[str, int | None] = {"full_at": None}
    for n in range(100_000):
        data = memoryview(
            (json.dumps({"type": "activity", "text": str(n), "ref": f"{ref}{n}"}) + "\n").encode()
        )
        while data:
            try:
                data = data[os.write(1, data) :]
            except BlockingIOError:
                report_full_when(pending_input() >= 60_000, state, n)
                time.sleep(0.01)
        report_full_when(pending_input() >= 60_000, state, n)
        full_at = state["full_at"]
        if full_at is not None and n - full_at > 600:
            break  # ~140 KB more acks than the pipe holds: the daemon's writes block
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
