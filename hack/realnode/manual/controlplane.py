"""The repo's ControlPlane with the kube-apiserver flags a real node needs (hack/realnode/manual/up).

Runs until SIGTERM/SIGINT; writes STATE/cp.json (server, workdir). The kubelet client flags name
files in the control plane's workdir, which exists only once it has started, so the API server is
restarted once with them (ControlPlane has no way to pass them at start yet). Reference only: the
Python harness replaces it. Usage: controlplane.py STATE_DIR [EXTRA_APISERVER_ARG...]
"""

import json
import signal
import sys
import threading
from pathlib import Path

try:  # the development package (dev/), where the harness lives since the split
    from ipnc_dev.controlplane import ControlPlane
except ImportError:  # before the split
    from istio_pod_network_controller.testing.controlplane import ControlPlane  # type: ignore[no-redef]

state = Path(sys.argv[1])
state.mkdir(parents=True, exist_ok=True)
cp = ControlPlane.start(extra_apiserver_args=sys.argv[2:])
pki = cp.workdir / "pki"
cp._apiserver_argv += [
    f"--kubelet-client-certificate={pki / 'admin.crt'}",
    f"--kubelet-client-key={pki / 'admin.key'}",
]
cp.restart_apiserver()
(state / "cp.json").write_text(json.dumps({"server": cp.server, "workdir": str(cp.workdir)}))
print("READY", cp.server, cp.workdir, flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
while not stop.wait(1):
    codes = cp.exit_codes()
    if any(code is not None for code in codes.values()):
        print("EXITED", codes, cp.logs(), flush=True)
        break
cp.stop()
print("STOPPED", flush=True)
