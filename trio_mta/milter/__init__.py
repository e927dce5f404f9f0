"""Milter client (SPEC §11): sans-IO protocol, trio connection, per-session chain."""
