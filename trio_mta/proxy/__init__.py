"""The HAProxy PROXY protocol (versions 1 and 2) as a pure parser over bytes (sans-IO).

A load balancer in front of a listener prepends one header to each connection
saying who the client really is. Like :mod:`trio_mta.smtp`, nothing in here
does I/O: :mod:`trio_mta.server.proxied` reads the socket and feeds the bytes.
"""

from trio_mta.proxy.header import (
    MAX_V1_LENGTH,
    NEED_DATA,
    V2_SIGNATURE,
    NeedData,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    format_v1,
    format_v2,
    parse_header,
)

__all__ = [
    "MAX_V1_LENGTH",
    "NEED_DATA",
    "V2_SIGNATURE",
    "NeedData",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "format_v1",
    "format_v2",
    "parse_header",
]
