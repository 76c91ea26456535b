"""``demo``: the whole system doing its job for real on one machine, in one command.

``scenario``: the sample application's pods as istiod injects them, and what counts as success;
``summary``: what is recorded and reported; ``display``: the terminal output;
``orchestration``: prerequisites, start and stop of every part, the story's steps, signals.
``realnode``: the same story on real nodes (``demo --real-node``).
"""

from .orchestration import DemoError, Options, check_prerequisites, run
from .scenario import NODES, SERVICES, added_capabilities, sample_pod
from .summary import process_start

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
