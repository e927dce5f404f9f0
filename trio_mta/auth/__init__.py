"""Mail authentication (SPEC §9): what proves who sent a message.

- :mod:`.keys`: DKIM private keys (load, generate) and the TXT record to publish;
- :mod:`.signing`: DKIM signatures for mail we accept from our own users;
- :mod:`.dkim_verify`, :mod:`.spf`, :mod:`.dmarc`: the three checks on inbound mail;
- :mod:`.results`: the ``Authentication-Results:`` header (RFC 8601);
- :mod:`.inbound`: the trio glue the SMTP session calls at the end of DATA.

Nothing here does network I/O except through :class:`trio_mta.dns.Resolver`: the
libraries that would do their own blocking DNS (dkimpy, pyspf) are fed answers the
trio resolver fetched.
"""
