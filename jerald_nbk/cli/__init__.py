"""Command-line tools: jerald, jerald-ldl, jerald-ref."""
