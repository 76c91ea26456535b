"""Rendering: redirect spec -> iptables-restore text (pure)."""

from .iptables import render
from .ruleset import OWN_CHAINS, Ruleset, TproxyRoute

__all__ = ["OWN_CHAINS", "Ruleset", "TproxyRoute", "render"]
