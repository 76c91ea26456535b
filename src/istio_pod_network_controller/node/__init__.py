"""The node side: find a pod's network namespace, apply its ruleset there, verify it, undo on failure.

The only layer that runs iptables. ``locate`` finds and pins a namespace (path, PID, or pod UID
through /proc cgroups), ``backend`` picks iptables-nft or -legacy like the host, ``apply`` writes
one restore transaction per family and reads it back; ``tables`` and ``routes`` hold the pure
text and state logic they use. See docs/node-side.md for the choices and their reasons.
"""
