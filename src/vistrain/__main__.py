"""``python -m vistrain`` runs the command line."""

from vistrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
