"""An --exec command that hangs, with a child in its process group:

    python hang_exec.py OUTDIR

writes OUTDIR/<pid>.pids (its pid and its child's, as JSON) and sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    out = Path(sys.argv[1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    name = f"{os.getpid()}.pids"
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "child": child.pid}))
    os.replace(tmp, out / name)
    time.sleep(600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
