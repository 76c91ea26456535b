"""Bounds on what a pod (or a manifest file) may hand the spec parsers.

Every value here comes from whoever can create or patch a pod, so each parser checks its input
against one of these before doing any work on it, and the work it then does is linear in the
input. Each bound is several times what a real Istio configuration needs: istio-init gets about
20 to 30 arguments, the longest real values are CIDR lists of a few hundred entries. Crossing one
is a ``LimitError`` (a ``SpecError``) naming the input and the bound; docs/configuration.md
("Limits on what pods give us") lists them.
"""

from __future__ import annotations

from ..bounded import MAX_JSON_DEPTH

# Arguments of one istio-iptables invocation (istio-init's args, our iptables-args annotation,
# or the `rules`/`apply` command line): Istio's injector writes about 30 at most.
MAX_ARGS = 256

# One argument, and so one flag value, in UTF-8 bytes: room for a list of MAX_LIST_ITEMS IPv6
# CIDRs at their longest (43 characters and a comma each).
MAX_ARG_BYTES = 64 * 1024

# One Istio traffic annotation's value that we parse (traffic.sidecar.istio.io/*, ...): the
# injector copies these into istio-init's args, so the same bound as one argument.
MAX_ANNOTATION_VALUE_BYTES = MAX_ARG_BYTES

# Our iptables-args annotation, the JSON list of istio-init's arguments: the API server's limit
# on all of an object's annotations together, so no annotation it accepts is refused here;
# typical ones are under 1 KiB.
MAX_IPTABLES_ARGS_ANNOTATION_BYTES = 256 * 1024

# Nesting of that annotation's JSON: a flat list of strings is depth 1.
MAX_IPTABLES_ARGS_DEPTH = 1

# Items in one comma list (ports, CIDRs, interfaces, groups, IDs, DNS servers), empty items not
# counted: real excludeOutboundIPRanges lists reach a few hundred CIDRs.
MAX_LIST_ITEMS = 1000

# `rules --pod` / `apply --pod` manifest files (JSON or YAML, possibly several documents): a Pod
# or workload is some KiB. PyYAML builds only about 0.5 MiB per second of the densest YAML (short
# items, one per line), with some hundred bytes of memory per item, so the bound is tighter than
# the API server's 1.5 MiB per object: the worst file costs about 2 seconds and 200 MB.
MAX_MANIFEST_BYTES = 1024 * 1024

# Nesting of a manifest (a Pod is about 10 levels deep), JSON or YAML.
MAX_MANIFEST_DEPTH = MAX_JSON_DEPTH

# Rules one pod's flags may make (both families, every table). Most grow linearly with a list,
# but each virtual interface (-k) adds a rule per outbound CIDR (-i): 1,000 of each would be a
# million rules and some hundred MB in the agent, which programs every pod of its node. Real
# configurations make tens; 1,000 excluded CIDRs for both families make about 2,000. The
# renderers stop counting as soon as they pass it.
MAX_RULES = 20_000

# istio-iptables' own limit: the included groups become the matches of a single rule.
MAX_OWNER_GROUPS_INCLUDE = 64
