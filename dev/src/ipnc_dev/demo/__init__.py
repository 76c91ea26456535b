"""``demo``: the whole system doing its job for real on one machine, in one command."""

from .orchestration import (
    NODES,
    SERVICES,
    DemoError,
    Options,
    added_capabilities,
    check_prerequisites,
    process_start,
    run,
    sample_pod,
)

__all__ = [
    "NODES",
    "SERVICES",
    "DemoError",
    "Options",
    "added_capabilities",
    "check_prerequisites",
    "process_start",
    "run",
    "sample_pod",
]
