"""The ``etda`` command: one module per command group, registered on ``app`` when imported
(the import order is the order of ``etda --help``)."""

from __future__ import annotations

import sys

# isort: off
from etda.cli._app import app
from etda.cli import attribute, experiments, mislabel, downstream, bench, explain, plan  # noqa: F401,E501

# isort: on


def main() -> None:  # pragma: no cover - `python -m etda.cli`
    app(prog_name="etda")


__all__ = ["app", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
