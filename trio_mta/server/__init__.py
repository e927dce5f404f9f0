"""The trio side of receiving: listeners, sessions, limits, and where messages go."""
