"""The command line, one module per command (``qdcompile <command>``; :mod:`qdcompile.cli` dispatches)."""
