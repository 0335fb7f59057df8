"""`python -m exporter.cli_entry` runs `ficoco-export` (used by tests on machines without the console script)."""

from exporter.cli import main

if __name__ == "__main__":
    main()
