"""Names on pods and namespaces that form the contract between the agent, the waiter, the
webhook and users. Kept from the original controller so existing users keep working."""

from __future__ import annotations

# Opt-in, on a pod or its namespace (annotation, or label on a namespace so that a webhook
# namespaceSelector can match it).
OPT_IN = "istio-pod-network-controller/initialize"
OPT_IN_VALUE = "true"

# Written by the agent.
STATUS = "pod-network-controller.istio.io/status"
DETAIL = "pod-network-controller.istio.io/detail"
STATUS_INITIALIZED = "initialized"
STATUS_ERROR = "error"
# The detail is read with this bound (and a nesting bound): the API server's limit on all of an
# object's annotations together, so any detail it stored can be read, at a bounded cost.
MAX_DETAIL_BYTES = 256 * 1024

# Written by the webhook when it removes an injected istio-init: its args, verbatim (JSON list).
IPTABLES_ARGS = "pod-network-controller.istio.io/iptables-args"

# The waiting init container the webhook injects (and the image's CLI subcommand it runs).
WAITER_CONTAINER = "istio-pod-network-init"
PODINFO_VOLUME = "istio-pod-network-podinfo"
PODINFO_PATH = "/etc/podinfo"
PODINFO_ANNOTATIONS = "annotations"  # the downward API item (file name) holding metadata.annotations
ANNOTATIONS_FILE = "/etc/podinfo/annotations"
WAITER_SUBCOMMAND = "init"

# Istio.
SIDECAR_STATUS = "sidecar.istio.io/status"

# OpenShift pods that must never be touched.
OPENSHIFT_DEPLOYER = "openshift.io/deployer-pod-for.name"
OPENSHIFT_BUILD = "openshift.io/build.name"
