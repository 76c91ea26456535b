"""The development subcommands of ``istio-pod-network-controller`` (``demo``, ``dev``), which the
product's CLI finds through the ``istio_pod_network_controller.commands`` entry-point group."""
