"""edge-agent: an IoT edge gateway on a durable SQLite event log."""

__version__ = "0.1.0"
