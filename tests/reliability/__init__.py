"""Reliability and security tests: faults, PgBouncer, bad input, injection, privileges."""
