"""``makima notify``: tell people about questions, on the desktop, by webhook or by a command.

One owner per concern, imports pointing downward:

- :mod:`.message` (pure): a question read from an event, bounded; the texts,
  the JSON payload and the environment built from it.
- :mod:`.signature` (pure): the webhook's HMAC-SHA256 signature, to make and to check.
- :mod:`.state` (pure): which question each notifier has told people about, and
  what to tell whom next; :mod:`.statefile` keeps it on disk, atomically.
- :mod:`.webhook`, :mod:`.execute`, :mod:`.desktop` (over :mod:`.dbus`): the notifiers.
- :mod:`.lanes`: one queue per notifier, retried with backoff, never blocking the others.
- :mod:`.follow`: the subscription to the daemon's events, reconnected with backoff.
- :mod:`.command`: the click command.
"""
