"""fedsynth's round policy as OpenFL's straggler policy (``straggler_handling_policy`` in plan.yaml).

OpenFL 1.9 waits for every collaborator by default (``WaitForAllPolicy``), so one dead hospital
stops the federation forever. ``pin-config`` writes this policy into plan.yaml with the values of
``federation.round_timeout_s`` and ``federation.min_sites``, the same rule the Flower server applies:

- every site reported: the round ends at once (no fixed wait);
- ``round_timeout_s`` after the round's first task was handed out, the round ends with the sites
  that reported, if there are at least ``min_sites`` (the others are stragglers for that round;
  OpenFL drops their partial results, and they take part again from the next round);
- fewer than ``min_sites`` by then: the federation fails and the aggregator exits with the reason
  (the Flower server ends its run the same way), instead of waiting forever.
"""

from __future__ import annotations

import logging
import time

from openfl.component.aggregator.straggler_handling import CutoffTimePolicy

from fedsynth.federated.compat import end_openfl_aggregator

log = logging.getLogger("fedsynth.openfl")


class RoundTimeoutPolicy(CutoffTimePolicy):
    """``round_timeout_s`` / ``min_sites`` of the pinned fedsynth config, applied by the aggregator."""

    def __init__(self, round_timeout_s: float, min_sites: int = 1, **kwargs: object) -> None:
        super().__init__(straggler_cutoff_time=float(round_timeout_s), minimum_reporting=int(min_sites))

    def _expired(self) -> bool:
        return bool(self.is_timer_started and self.round_start_time is not None
                    and time.time() - self.round_start_time >= self.straggler_cutoff_time)

    def straggler_cutoff_check(self, num_collaborators_done: int, num_all_collaborators: int) -> bool:
        if num_collaborators_done >= num_all_collaborators:
            return True
        if not self._expired():
            return False
        if num_collaborators_done >= self.minimum_reporting:
            log.warning("round timeout (%.0f s): ending the round with %d of %d sites (federation.min_sites=%d)",
                        self.straggler_cutoff_time, num_collaborators_done, num_all_collaborators, self.minimum_reporting)
            return True
        from fedsynth.federated.openfl import aggregation

        message = (f"round timeout (federation.round_timeout_s={self.straggler_cutoff_time:g}): only "
                   f"{num_collaborators_done} of {num_all_collaborators} sites reported, fewer than "
                   f"federation.min_sites={self.minimum_reporting}")
        log.error("the federation failed: %s", message)
        if aggregation.EXIT_ON_ROUND_FAILURE:
            end_openfl_aggregator(aggregation.ROUND_FAILURE_STATUS, message)
        return False
