"""How rollout replicas learn about new trainer weights, whichever path carries them.

A small named Ray actor per rollout service, the *weight board*, holds the
latest announcement: either "join the broadcast group at host:port" (the
torch.distributed path) or "version v is in the store under prefix" (the
object-store path). Every replica runs `follow_board` in a thread: it
long-polls the board and, for a broadcast announcement, joins the group and
receives every version the trainer sends until the trainer goes away.

Replicas are not addressed one by one (a Serve handle routes each call to
*some* replica), so the replicas come to the trainer rather than the
trainer to them; ranks inside the group are handed out by the group's store.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from cropi.distributed.weight_sync import Apply, SyncGroup, receive_weights

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class WeightBoard:
    """The latest weight announcement of one rollout service (epoch-numbered)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.info: dict[str, Any] = {}

    def announce(self, info: dict[str, Any]) -> int:
        self.epoch += 1
        self.info = info
        return self.epoch

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


def follow_board(board: ray.actor.ActorHandle, apply: Apply, load_from_store: Callable[[str, str, int], None],
                 stop: threading.Event) -> None:
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
        try:
            if info["path"] == "store":
                load_from_store(info["store_url"], info["prefix"], info["version"])
                continue
            group = SyncGroup.join_receiver(info["host"], info["port"], backend=info["backend"],
                                            timeout_s=info.get("timeout_s", 600))
            try:
                while not stop.is_set():
                    receive_weights(group, apply)
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
