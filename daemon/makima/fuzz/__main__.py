"""``python -m makima.fuzz canary | lines PLAN LOG | sink``: the runner's agents."""

import sys

from makima.fuzz.agents import main

sys.exit(main())
