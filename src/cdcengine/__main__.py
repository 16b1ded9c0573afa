"""`python -m cdcengine …` runs the command line (the same as the `cdcengine` script)."""

from cdcengine.serve.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
