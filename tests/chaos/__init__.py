"""The chaos run: worker processes killed, connections terminated, Postgres restarted."""
