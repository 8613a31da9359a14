"""Attribution methods over a shared template (``etda.methods.base``)."""

from __future__ import annotations

from etda.methods.base import Combiner, MemberContext, MemberResult, Method
from etda.methods.gradcos import GradCos
from etda.methods.graddot import GradDot
from etda.methods.influence import InfluenceFunction
from etda.methods.tracin import TracIn
from etda.methods.trak import TRAK

METHODS: dict[str, type[Method]] = {
    "graddot": GradDot,
    "gradcos": GradCos,
    "tracin": TracIn,
    "if": InfluenceFunction,
    "trak": TRAK,
}


def get_method(name: str | Method, **options) -> Method:
    """A method object from its name (``graddot | gradcos | tracin | if | trak``)."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    import inspect

    accepted = set(inspect.signature(METHODS[name]).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"method {name!r} does not take option(s) {unknown}; "
            f"it accepts {sorted(accepted) or 'none'}"
        )
    return METHODS[name](**options)


__all__ = [
    "METHODS",
    "Combiner",
    "GradCos",
    "GradDot",
    "InfluenceFunction",
    "MemberContext",
    "MemberResult",
    "Method",
    "TRAK",
    "TracIn",
    "get_method",
]
