"""istio-pod-network-controller: Istio's traffic redirection, programmed from a node agent.

The package is layered from pure to effectful: ``spec`` (validated options), ``render``
(spec -> iptables-restore text), ``node`` (namespaces, apply, verify), ``cluster`` (API I/O),
and the entry points in ``cli``.
"""

__version__ = "0.1.0"
