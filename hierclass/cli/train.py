"""CLI commands: train (filled in by its issue)."""
