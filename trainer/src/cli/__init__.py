"""Command lines: `kontrast train`, `kontrast evaluate`, `kontrast launch`, and their exit codes."""
