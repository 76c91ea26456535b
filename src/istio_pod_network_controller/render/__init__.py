"""Rendering: redirect spec -> structured rules per family (pure); restore text on demand."""

from .iptables import render
from .rules import FamilyRules, Rule, RulesetFormatError
from .ruleset import OWN_CHAINS, Ruleset, TproxyRoute

__all__ = ["OWN_CHAINS", "FamilyRules", "Rule", "Ruleset", "RulesetFormatError", "TproxyRoute", "render"]
