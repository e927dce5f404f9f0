"""Errors of the server that callers outside it catch, in a module that imports nothing.

The ``[server] workers`` supervisor binds listeners and reports ``ListenError`` but
never runs a session: importing it from here keeps the session, routing and queue
code (and their memory) out of the supervising process.
"""


class ListenError(Exception):
    """A listener could not be bound, or accept(2) failed for good; the message names it."""
