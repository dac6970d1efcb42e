"""An --exec command for the tests: writes what it got (stdin, MAKIMA_* variables)
to OUTDIR/<question id>.<event>.json, atomically.

    python record_exec.py OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    out = Path(sys.argv[1])
    stdin = sys.stdin.buffer.read().decode()
    env = {k: v for k, v in os.environ.items() if k.startswith("MAKIMA_")}
    name = f"{env['MAKIMA_QUESTION_ID']}.{env['MAKIMA_EVENT']}.json"
    tmp = out / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps({"stdin": stdin, "env": env, "pid": os.getpid()}))
    os.replace(tmp, out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
