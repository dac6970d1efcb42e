"""A test agent that relays its stdio to a Unix socket the test listens on,
so the test itself speaks makima-agent/1 by hand, line by line.

    python relay_agent.py SOCKET_PATH

stdin → socket and socket → stdout. Exits 0 when either side closes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def main() -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sys.argv[1])
    conn.sendall(f"{os.getpid()}\n".encode())  # first line: who we are

    def stdin_to_socket() -> None:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=stdin_to_socket, daemon=True).start()
    while True:
        data = conn.recv(65536)
        if not data:
            return 0
        os.write(1, data)


if __name__ == "__main__":
    sys.exit(main())
