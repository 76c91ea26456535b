"""istio-pod-network-controller's development package: never installed in the image.

The test harness (a real etcd + kube-apiserver, the chart rendered by helm, node stand-ins with
real network namespaces and processes, agent and webhook processes) and the ``demo`` and ``dev``
commands that drive it. The product (``istio_pod_network_controller``) never imports this package;
``tests/unit/test_product_boundary.py`` fails if it does. ``demo`` and ``dev`` reach the product's
CLI through the ``istio_pod_network_controller.commands`` entry-point group.
"""
