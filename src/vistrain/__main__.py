"""``python -m vistrain`` runs the command line.

Ctrl-C while the command line is still loading (before ``main`` can catch it) also ends
with one line and status 130 instead of a traceback.
"""

import sys

if __name__ == "__main__":
    try:
        from vistrain.cli import main

        code = main()
    except KeyboardInterrupt:
        sys.stderr.write("vistrain: interrupted\n")
        code = 130
    raise SystemExit(code)
