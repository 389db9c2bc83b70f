"""Whether the cluster's control plane still answers: a plain record of what the probes saw.

The runtime probes the GCS and this node's raylet every ``health_interval`` seconds
(:func:`limner.ray._cluster.unreachable`) and tells this record what it saw; the record says
when the control plane went away, when it came back, and when the runtime gives up on it
(``control_plane_timeout`` seconds after the first failed probe). No I/O and no clock here,
so the rule is tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ControlPlaneWatch", "Verdict"]

Verdict = Literal["unreachable", "back", "lost"]


@dataclass
class ControlPlaneWatch:
    """The control plane as last probed: ``problem`` says why it is unreachable (None while
    it answers), since ``since`` (monotonic seconds); ``lost`` once the runtime gave up."""

    timeout: float
    problem: str | None = None
    since: float | None = None
    lost: bool = False

    def observe(self, problem: str | None, now: float) -> Verdict | None:
        """Record one probe (``problem`` None: it answered) at ``now``; return what changed:
        ``"unreachable"`` at the first failure, ``"back"`` when it answers again before the
        timeout, ``"lost"`` when it has not answered for ``timeout`` seconds (for good)."""
        if self.lost:
            return None
        if problem is None:
            if self.problem is None:
                return None
            self.problem = self.since = None
            return "back"
        first = self.since is None
        if self.since is None:
            self.since = now
        self.problem = problem
        if now - self.since >= self.timeout:
            self.lost = True
            return "lost"
        return "unreachable" if first else None
