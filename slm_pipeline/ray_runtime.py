"""Connecting to Ray: the cluster at RAY_ADDRESS (or the one a Ray Job runs in), else a local one."""

from __future__ import annotations

import logging
import os


def init_ray() -> None:
    """Start or join Ray once per process, quietly: our own progress bars say what matters."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        ray.init(
            # ray.init() joins RAY_ADDRESS when set; the local dashboard would only cost start-up time.
            include_dashboard=False if local else None,
            logging_level=logging.WARNING,
        )
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data warns once that its bars are off; ours (tokens/s) replace them.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
