"""Reliability and security suite (issue 9): faults, restarts, bad input, secrets, Postgres."""
