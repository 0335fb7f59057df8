"""ficoco."""
