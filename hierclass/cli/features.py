"""CLI commands: features (filled in by its issue)."""
