"""A node stand-in: the kubelet's part for one simulated node, for cluster tests and ``demo``.

The test control plane has no kubelet, so nothing would give a pod what the agent and the
waiter need from a node: a network namespace with the pod's IP, processes whose cgroups name the
pod (the agent finds a pod's namespace by scanning ``/proc/*/cgroup`` for its UID), a downward API
file of its annotations (the waiter reads it), its containers running in order, and the status a
kubelet reports. ``NodeStandIn`` provides all of that for the pods bound to one node name, with
real kernel objects, so that the real agent, waiter and webhook can be run against it:

* list+watch of ``spec.nodeName=<node>`` pods (``watch``: lightkube's client, not the agent's
  reflector, so that a bug there cannot act on both sides of a test; reconnects, 410 Gone);
* per pod a sandbox: a network namespace on the stand-in's bridge (``Netlab``; IPv4, IPv6 when
  asked) and a long-lived pause process inside it, placed in kubelet-style pod cgroups
  (``KubeletCgroups``: the v2 tree and the v1 ``pids`` tree, which impose no limits; the
  process's other cgroups, memory included, stay as they were -- on a hybrid machine such as the
  ones the tests run on; where the v2 tree is the only one it also holds the memory controller,
  and the process leaves its memory cgroup for one without limits);
* volumes in a per-pod folder laid out as the kubelet's (``<workdir>/pods/<uid>/volumes/
  kubernetes.io~<type>/<name>``): downward API files written by the kubelet's atomic writer and
  rewritten as soon as a watched pod's labels or annotations change; projected service account
  tokens (TokenRequest), config maps and secrets read once; emptyDir folders;
* init containers in order (crash-loop back-off on failure, native sidecars started and left
  running), then the containers, as processes in the pod's namespace with the container's UID
  (see ``kubelet.plan`` for which program runs for which image);
* the status subresource patched as the kubelet would (pod IPs, host IP, phase, conditions,
  container states with reasons, ``restartCount``);
* on deletion the processes are stopped, the namespace, its veth pair and the cgroups removed, and
  the deletion confirmed (``gracePeriodSeconds: 0``, UID precondition), as the kubelet does.

**Paths inside containers.** There is no mount namespace: a container's process sees the host's
file system. A volume mounted at ``mountPath`` is the folder ``PodView.volume_dirs[<volume>]``
(``subPath`` appended); any argument, command word or environment value that names a path under
a mount path (also as ``--flag=PATH``) is rewritten to the folder. The waiter (``init``) without
``--file`` gets ``--file <folder>/annotations`` when a volume is mounted at ``/etc/podinfo``.

**Threads.** Each stand-in runs one asyncio event loop in its own daemon thread; every process it
starts is started from that thread (their parent-death signal is tied to it). The public methods
are thread-safe and block; call them from tests or from ``demo``'s main thread. Several stand-ins
coexist in one process: each has its own bridge (in its own "node" namespace), its own pod subnet
(10.244.16n.0/20, fd00:10:244:n::/64), so pod IPs never collide, and its own cgroup folder.
Pods of different stand-ins cannot reach each other (no route between the bridges).

**Not modelled** (documented choices): an Istio proxy image running ``istio-iptables`` (an
istio-init the webhook did not replace) is not run, as it would need NET_ADMIN: it is reported as
a ``StartError`` (exit 128) naming that reason and retried with back-off, so the pod stays in
``Init`` visibly. Project and command containers asking for UID 0 are refused the same way unless
``allow_root``. Readiness, liveness and startup probes are not run (a started container is ready;
a stub is ready once it listens). A ``hostNetwork`` pod runs in the stand-in's node namespace
(not the machine's), with the node's IP. Volumes that cannot be had (a missing config map, a
refused token) leave their files out and add a note to the pod's view instead of blocking the pod.
No Events are written. Tokens are not refreshed. Changes to a running pod's spec (a new image)
are not acted on.

**Which program runs** (``kubelet.plan``): the project's image (``Images.project`` in the image
reference) runs the project's CLI with the container's arguments, in this interpreter, through
``launch`` (it drops to the container's UID after loading, since this machine's
interpreter lives under ``/root``); Istio's proxy image with ``proxy ...`` runs the stub proxy
(``stubproxy --record``: 15001, 15006, 15020, 15021, 15090 and its container ports, as
1337 by default); any other image runs its ``command`` if it has one (from the host's file
system, as the container's UID via ``nsenter --setuid``), else the app stub: ``probe``
(driven by ``app_request``) plus, for its container ports, a ``stubproxy`` server that answers
and records. Containers run as ``runAsUser``/``runAsGroup`` (container, then pod), else 1000.
"""

from .node import NodeStandIn
from .views import ContainerView, PodView

__all__ = ["ContainerView", "NodeStandIn", "PodView"]
