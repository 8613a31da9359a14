"""Attribution methods over one template (``etda.methods.base``); each registers itself in
``METHODS`` when its module is imported."""

from __future__ import annotations

from etda.methods.base import (
    METHODS,
    CombineRule,
    Diagonal,
    KernelTimesMeanQ,
    Mean,
    MemberContext,
    MemberFactors,
    Method,
    get_method,
    method_takes,
)
from etda.methods.gradcos import GradCos

# isort: off  (import order is registration order: how the CLI and reports list them)
from etda.methods.graddot import GradDot
from etda.methods.influence import InfluenceFunction
from etda.methods.tracin import TracIn
from etda.methods.trak import TRAK

# isort: on

__all__ = [
    "METHODS",
    "CombineRule",
    "Diagonal",
    "GradCos",
    "GradDot",
    "InfluenceFunction",
    "KernelTimesMeanQ",
    "Mean",
    "MemberContext",
    "MemberFactors",
    "Method",
    "TRAK",
    "TracIn",
    "get_method",
    "method_takes",
]
