"""The SMTP server on trio: listeners, one task per connection, the session.

Owns accepting connections and their limits, driving the sans-IO server
machine over the socket, STARTTLS by wrapping the live stream in
``trio.SSLStream``, timeouts, AUTH (:mod:`~trio_mta.server.passwords`), the
handler API for embedders (:mod:`~trio_mta.server.handler`) and trace headers.
Must not decide routing (it asks :mod:`trio_mta.routing`) or write mail files
itself (it hands messages to the queue or a handler).
"""
