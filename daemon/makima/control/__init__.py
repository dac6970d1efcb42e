"""makima-control/1: the local control socket (codec, server, client)."""
