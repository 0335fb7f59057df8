"""The bundle contract between `ficoco/` and its consumers: layout, names, manifest, sessions, checking core."""
