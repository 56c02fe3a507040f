"""How rollout replicas learn about new trainer weights, whichever path carries them.

A small named Ray actor per rollout service, the *weight board*, holds the
latest announcement: "join the broadcast group at host:port" (the
torch.distributed path), "version v is in the store under prefix" (the
object-store path) or "job J starts: back to the base weights" (a standing
service changing hands). Every replica runs `follow_board` in a thread: it
long-polls the board and, for a broadcast announcement, joins the group and
receives every version the trainer sends until the trainer goes away.

The board also holds the service's *owner*: the one job whose weights the
replicas hold. A standing service (one Serve app that outlives jobs) is
claimed by each job in turn; a per-job service belongs to its job from the
start.

Replicas are not addressed one by one (a Serve handle routes each call to
*some* replica), so the replicas come to the trainer rather than the
trainer to them; ranks inside the group are handed out by the group's store.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import ray

from cropi.executors.ray.weight_sync import SyncGroup, receive_weights

if TYPE_CHECKING:
    from cropi.executors.ray.replica import RolloutReplica

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class WeightBoard:
    """The latest weight announcement of one rollout service (epoch-numbered) and its owner."""

    def __init__(self) -> None:
        self.epoch = 0
        self.info: dict[str, Any] = {}
        self._owner: str | None = None

    def announce(self, info: dict[str, Any]) -> int:
        self.epoch += 1
        self.info = info
        return self.epoch

    def owner(self) -> str | None:
        return self._owner

    def claim(self, job: str, previous: str | None) -> bool:
        """Compare-and-set the owner; a new owner's replicas go back to the base weights."""
        if self._owner != previous:
            return False
        if job != previous:
            self._owner = job
            self.announce({"path": "base", "owner": job})
        return True

    def release(self, job: str) -> None:
        if self._owner == job:
            self._owner = None

    async def wait_newer(self, epoch: int, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]] | None:
        import asyncio

        deadline = time.monotonic() + timeout_s
        while self.epoch <= epoch and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return (self.epoch, self.info) if self.epoch > epoch else None


BOARD_NAMESPACE = "cropi"


def board_name(app_name: str) -> str:
    return f"{app_name}-weights"


def get_or_create_board(app_name: str) -> ray.actor.ActorHandle:
    """The service's board (created by whoever comes first; lives as long as the Ray namespace)."""
    # An explicit namespace: Serve replicas, Ray Train workers and drivers live in different ones.
    return WeightBoard.options(name=board_name(app_name), namespace=BOARD_NAMESPACE, get_if_exists=True,
                               lifetime="detached").remote()


def follow_board(board: ray.actor.ActorHandle, replica: RolloutReplica, stop: threading.Event) -> None:
    """Replica side (run in a thread): apply every announced version until `stop` is set."""
    epoch = 0
    while not stop.is_set():
        try:
            news = ray.get(board.wait_newer.remote(epoch))
        except Exception:  # the board is being restarted with the service: look again
            log.exception("weight board unavailable")
            stop.wait(1.0)
            continue
        if news is None:
            continue
        epoch, info = news
        owner = info.get("owner")
        try:
            if info["path"] == "base":
                replica.load_base(owner)
                continue
            if info["path"] == "store":
                replica.load_weights_from_store(info["store_url"], info["prefix"], info["version"], owner)
                continue
            group = SyncGroup.join_receiver(info["host"], info["port"], backend=info["backend"],
                                            timeout_s=info.get("timeout_s", 600))
            try:
                while not stop.is_set():
                    receive_weights(group, partial(replica.apply_bucket, owner=owner))
            finally:
                group.close()
        except Exception as err:  # the trainer finished or died: wait for its next announcement
            log.info("weight sync epoch %d ended: %s", epoch, err)


def node_address() -> str:
    """An address of this node that the other Ray nodes can reach."""
    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())
