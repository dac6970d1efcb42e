"""Example agents shipped with makima (see examples/agents/ in the source tree)."""
