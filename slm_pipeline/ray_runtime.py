"""Connecting to Ray: the cluster at RAY_ADDRESS (or the one a Ray Job runs in), a live cluster an earlier
`ray start` left on this machine, else a local Ray of this command's own.

Ray's own `ray.init()` joins the address recorded in its temp dir by `ray start --head` even when that
cluster was killed, and then retries the dead address for about a quarter of an hour. Every address is
probed here first, within seconds: a dead RAY_ADDRESS is one line naming it; a dead recorded address is
ignored (with a note) and the command runs on a Ray of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from slm_pipeline.errors import SlmError, exception_chain

CONNECT_TIMEOUT_S = 10.0
"""How long an address may take to accept a connection before it counts as gone."""
ROUNDS_WITHOUT_PROGRESS_ALLOWED = 3
"""Lost Ray workers in a row, with nothing completed between, before a stage that runs in rounds gives up."""


def init_ray() -> None:
    """Start or join Ray once per process, quietly: our own progress bars say what matters."""
    import ray

    if not ray.is_initialized():
        # A cluster with token authentication needs RAY_AUTH_MODE=token here, as for any Ray driver: enabling
        # it for a cluster without would make this driver's actors die as they start.
        address = choose_address()
        ray.init(
            address=address,
            # Only a local Ray of our own starts a dashboard: it would cost start-up time and a port.
            include_dashboard=False if address == "local" else None,
            logging_level=logging.WARNING,
        )


def init_ray_data() -> None:
    """init_ray, and Ray Data set up for a stage that runs on it (score, select): quiet, no bars of its own."""
    from ray.data import DataContext

    init_ray()
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Every error Ray Data logs (with a full stack trace) also reaches the driver as an exception, which the
    # stage reports as one line, recovers from (a lost worker) or raises.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    # Ray Data warns once that its bars are off; ours (tokens/s) replace them.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def choose_address() -> str:
    """RAY_ADDRESS when it answers (else an SlmError); a cluster recorded by `ray start` on this machine
    when it answers; else "local" (a Ray of this process's own)."""
    from ray._private.utils import read_ray_address

    named = os.environ.get("RAY_ADDRESS", "").strip()
    if named and named != "auto":
        if named != "local" and not answers(named):
            raise SlmError(
                f"no Ray cluster answers at {named} (RAY_ADDRESS) within {CONNECT_TIMEOUT_S:.0f} s: start it "
                "(`ray start --head`), point RAY_ADDRESS at a live head, or unset RAY_ADDRESS to run on a local Ray"
            )
        return named
    recorded = read_ray_address()
    if recorded and answers(recorded):
        return recorded
    if named == "auto":
        raise SlmError(
            f"RAY_ADDRESS=auto: no live Ray cluster on this machine (recorded: {recorded or 'none'}); "
            "start one with `ray start --head`, or unset RAY_ADDRESS to run on a local Ray"
        )
    if recorded:
        print(
            f"note: the Ray cluster recorded at {recorded} by an earlier `ray start` does not answer; "
            "running on a local Ray of this command's own (`ray stop` clears the record)",
            file=sys.stderr,
        )
    return "local"


def answers(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections at a Ray address (HOST:PORT, ray://HOST:PORT or a
    dashboard's http(s)://HOST:PORT): a killed head refuses at once, an unreachable host counts as gone
    after `timeout_s`."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        host = port = None
    if not host or not port:
        raise SlmError(
            f"{address}: expected HOST:PORT (a head's GCS, e.g. ray-head:6379), ray://HOST:PORT or http://HOST:PORT"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def use_ray_token_if_available() -> None:
    """Send the local Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) to a dashboard as
    `ray start` does when it finds one: Ray 2.5x clusters require it by default, and Ray's job client sends it
    only with RAY_AUTH_MODE=token. The token itself is never read or printed here."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def lost_worker(error: BaseException):
    """The Ray system failure behind `error` (a dead actor, worker, node or lost object), or None when the
    error is anything else (a bad input, a bug: retrying would fail again)."""
    from ray.exceptions import (
        LocalRayletDiedError,
        NodeDiedError,
        ObjectLostError,
        RayActorError,
        RaySystemError,
        WorkerCrashedError,
    )

    lost = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, LocalRayletDiedError, RaySystemError)
    return next(
        (e for e in exception_chain(error) if isinstance(e, lost) and not getattr(e, "actor_init_failed", False)),
        None,
    )


class LostWorkers:
    """A stage that runs in rounds of Ray work, each going on from what the last one completed: after a failed
    round, `lost` gives the lost worker behind the failure (any other error is raised again) and `stalled` says
    whether more than ROUNDS_WITHOUT_PROGRESS_ALLOWED rounds in a row lost one with no progress between."""

    def __init__(self) -> None:
        self.progress = -1
        self.rounds_without_progress = 0

    def lost(self, error: Exception, progress: int) -> BaseException:
        """The lost worker behind `error`; `progress`: what the stage has completed (shards)."""
        lost = lost_worker(error)
        if lost is None:
            raise error
        self.rounds_without_progress = 0 if progress > self.progress else self.rounds_without_progress + 1
        self.progress = progress
        return lost

    @property
    def stalled(self) -> bool:
        return self.rounds_without_progress > ROUNDS_WITHOUT_PROGRESS_ALLOWED


def lost_worker_reason(lost: BaseException) -> str:
    """One line on what was lost: Ray's "died because ..." line when it has one (its node died, it was killed)."""
    from ray.exceptions import ActorUnavailableError

    if isinstance(lost, ActorUnavailableError):  # Ray's own text is an RPC error several lines long
        return "a Ray actor became unreachable (its process or its node is gone)"
    lines = str(lost).splitlines() or [type(lost).__name__]
    return next((line.strip() for line in lines if "because" in line), lines[0].strip())
