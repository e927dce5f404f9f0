"""trio_mta: a mail transfer agent on trio."""

__version__ = "0.1.0"
