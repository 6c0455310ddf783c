"""Developer tools (``python -m qdcompile.tools.<name>``)."""
