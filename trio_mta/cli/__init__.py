"""The ``trio-mta`` command line (SPEC §2): ``serve``, ``check-config``,
``queue``, ``passwd``, ``sendmail``.

Each subcommand lives in its own module; :mod:`~trio_mta.cli.main` parses the
arguments and maps every failure to one line and an exit code (0, 1, 2, or
sysexits for ``sendmail``). No traceback reaches the terminal.
"""
