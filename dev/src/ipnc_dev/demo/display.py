"""The demo's terminal output: event lines with timings, and on a terminal a live pod table
with a spinner under them (rich); plain lines otherwise (CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any

from .summary import PodRecord, pod_table


class Display:
    """Progress as it happens: a live pod table under the event lines on a terminal, plain lines
    with timings otherwise (CI, pipes). Both print the same event lines."""

    def __init__(self, *, live: bool | None = None) -> None:
        from rich.console import Console

        interactive = sys.stdout.isatty() if live is None else live
        self.console = Console(
            highlight=False,
            soft_wrap=not interactive,
            width=None if interactive else 200,
            force_terminal=interactive,
        )
        self.interactive = interactive
        self.t0 = time.monotonic()
        self.activity = ""
        self.pods: list[PodRecord] = []
        self._live: Any = None
        if interactive:
            from rich.live import Live

            self._live = Live(
                get_renderable=self._render,
                console=self.console,
                refresh_per_second=10,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _stamp(self) -> str:
        return f"[dim]{self.elapsed():6.1f}s[/dim]"

    def line(self, text: str) -> None:
        self.console.print(f"{self._stamp()}  {text}")

    def plain(self, text: str = "") -> None:
        self.console.print(text)

    def begin(self, activity: str) -> None:
        """What the demo is doing now (shown with a spinner on a terminal)."""
        self.activity = activity

    def done(self, text: str, seconds: float | None = None) -> None:
        took = f" [dim]({seconds:.1f} s)[/dim]" if seconds is not None else ""
        self.line(f"[green]✓[/green] {text}{took}")
        self.activity = ""

    def detail(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.console.print(f"{'':9}    [dim]{line}[/dim]", markup=True)

    def fail(self, text: str) -> None:
        self.line(f"[red]✗ {text}[/red]")

    def _render(self) -> Any:
        from rich.console import Group
        from rich.spinner import Spinner

        parts: list[Any] = []
        if self.pods:
            parts.append(pod_table(self.pods, live=True, wide=self.console.width >= 100))
        if self.activity:
            parts.append(Spinner("dots", text=f" {self.activity}"))
        return Group(*parts)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
