"""One engine over several processes (a multi-host mesh, `jax.distributed`) behind one transport.

Process 0 takes the requests (its transport registers with Dynamo, or listens); every process must
still run the same engine steps on the same requests, or they call different programs and hang in a
collective. So process 0's engine loop publishes, for each turn that changes anything, the commands
it applied (requests added, with their ids, parameters and arrival times; aborts; stop) and whether
it then steps; the other processes replay exactly that (`follow`). The channel is jax.distributed's
own key-value store on the coordinator: nothing else to run or configure.

Time and fresh seeds are agreed by the engine itself (runtime/clock.py). A process that dies leaves
the others stuck in a collective: process 0's step watchdog (`step_timeout_s`) then fails it, and
its supervisor restarts the set.
"""

from __future__ import annotations

import base64
import logging
import pickle
from typing import Any

log = logging.getLogger("meshserve.mirror")

KEEP = 4096  # published turns kept in the store (a follower never lags that far: steps are collectives)


class StepMirror:
    """Process 0's side (`publish`) and the others' (`receive`) of one ordered channel of turns."""

    def __init__(self, prefix: str = "meshserve/turns", client=None):
        if client is None:
            from jax._src.distributed import global_state

            client = global_state.client
            if client is None:
                raise RuntimeError("jax.distributed is not initialized")
        self._client = client
        self._prefix = prefix
        self._n = 0

    def publish(self, commands: list[tuple], step: bool) -> None:
        payload = base64.b64encode(pickle.dumps((commands, step))).decode()  # between our own processes
        self._client.key_value_set(f"{self._prefix}/{self._n}", payload)
        if self._n >= KEEP:
            self._client.key_value_delete(f"{self._prefix}/{self._n - KEEP}")
        self._n += 1

    def receive(self, poll_s: float = 60.0) -> tuple[list[tuple], bool]:
        """The next turn; waits as long as process 0 has nothing to do."""
        key = f"{self._prefix}/{self._n}"
        while True:
            try:
                payload = self._client.blocking_key_value_get(key, int(poll_s * 1000))
                break
            except Exception as e:  # a timeout: idle, keep waiting (a dead coordinator fails elsewhere too)
                if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                    raise
        self._n += 1
        return pickle.loads(base64.b64decode(payload))


def add_command(request) -> tuple:
    """A checked Request (runtime/request.py) as a turn's command."""
    return ("add", request)


def apply(engine, command: tuple[Any, ...]) -> bool:
    """Replay one command on a following process; False for "stop"."""
    kind = command[0]
    if kind == "add":
        engine.add(command[1])  # checked on process 0
    elif kind == "abort":
        engine.abort(command[1])
    elif kind == "stop":
        return False
    return True


def follow(engine, mirror: StepMirror) -> None:
    """A following process: replay process 0's turns until it stops."""
    while True:
        commands, step = mirror.receive()
        for command in commands:
            if not apply(engine, command):
                log.warning("process 0 stopped: this process stops too")
                return
        if step:
            engine.step()  # the outputs are process 0's to deliver
