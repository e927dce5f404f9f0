"""Configuration: one TOML file into frozen dataclasses (SPEC §3).

Owns reading and checking the file (:mod:`~trio_mta.config.loader`), the
value rules shared by every key (:mod:`~trio_mta.config.schema`), the mailbox
and alias maps (:mod:`~trio_mta.config.maps`) and durations
(:mod:`~trio_mta.config.durations`). Every problem is reported at once, each
naming its key; nothing here opens a socket or starts a task.
"""

from trio_mta.config.loader import (
    AuthConfig,
    Config,
    ConfigError,
    DnsConfig,
    LimitsConfig,
    ListenConfig,
    LocalConfig,
    LogConfig,
    MetricsConfig,
    QueueConfig,
    RelayConfig,
    ServerConfig,
    TlsConfig,
)

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "LimitsConfig",
    "ListenConfig",
    "LocalConfig",
    "LogConfig",
    "MetricsConfig",
    "QueueConfig",
    "RelayConfig",
    "ServerConfig",
    "TlsConfig",
]
