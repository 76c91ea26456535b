"""The redirect spec: validated, typed options for one pod (pure)."""

from .errors import OutOfScope, SpecError
from .flags import parse_flags
from .model import InterceptionMode, RedirectSpec
from .pod import spec_from_pod

__all__ = ["InterceptionMode", "OutOfScope", "RedirectSpec", "SpecError", "parse_flags", "spec_from_pod"]
