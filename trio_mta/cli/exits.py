"""Exit codes of the ``trio-mta`` commands (SPEC §2): 0 ok, 1 failure, 2 bad config or usage."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
