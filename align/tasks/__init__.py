"""Built-in verifiable tasks that need no download (the embedded default)."""
