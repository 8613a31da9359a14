"""The ``etda`` console script: ``etda --version`` answers without importing torch or the
CLI's dependencies; every other command loads the CLI (``etda.cli``)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):
        from etda._version import __version__

        print(f"etda {__version__}")
        return
    from etda.cli import app

    app()


if __name__ == "__main__":
    main()
