"""The engine's end of the link to the frontend: the Notifier the service loop uses.

The frontend is a multiprocessing child (so that multiprocessing-logging can
carry its records), but nothing crosses this link as a pickle: NOTIFY and
STATUS (or CHANGES: only what changed since the last one the frontend was sent) go down,
DONE comes up, all in agent/protocols/frontend.py's fixed layouts.
Everything the frontend sends is decoded strictly; a record that does not
decode, carries descriptors or is truncated (privileged/records.py) means the frontend is not what
we started, and FrontendGone ends the service.
"""

from __future__ import annotations

import json
import logging
import multiprocessing.process
import socket
import time
from collections.abc import Callable

from agent.engine.service import FrontendGone
from agent.protocols import frontend as fw
from agent.protocols.verb import Verb
from privileged import records

log = logging.getLogger("hv-vss-agent")

class FrontendLink:
    def __init__(self, sock: socket.socket, proc: multiprocessing.process.BaseProcess,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self.proc = proc
        self.clock = clock
        # The status the frontend holds now, if it is whole: what CHANGES are made against.
        self.sent: dict[str, object] | None = None
        # How many subscribers the frontend last said an event would reach (None: not said).
        self.hearing: int | None = None
        self.sock.setblocking(False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def notify(self, event: Verb, txid: int, deadline: float) -> bool:
        """False, with nothing sent, when the frontend last said that no subscriber would
        hear it: the round trip would only add to the host's wait."""
        if self.hearing == 0:
            return False
        ms = int((deadline - self.clock()) * 1000)
        self._send(fw.encode_notify(fw.Notify(event, txid, ms)), must=True)
        return True

    def publish(self, status: dict[str, object]) -> None:
        """Bring the frontend's copy of the status up to `status`: with only what changed
        when it holds the last one whole, else all of it (the oldest transactions left out
        if it does not fit one record)."""
        if self.sent is not None:
            data = json.dumps(fw.make_changes(self.sent, status), separators=(",", ":"),
                              default=str).encode()
            if len(data) <= fw.MAX_STATUS:
                self.sent = status if self._send(fw.encode_status(data, whole=False),
                                                 must=False) else None
                return
        whole = status
        data = json.dumps(status, separators=(",", ":"), default=str).encode()
        while len(data) > fw.MAX_STATUS:  # the oldest transactions go first
            txs = status.get("transactions")
            if not isinstance(txs, list) or not txs:
                log.warning("a status of %d bytes is too large to publish", len(data))
                return
            status = {**status, "transactions": txs[len(txs) // 2 + 1:],
                      "transactions_trimmed": True}
            data = json.dumps(status, separators=(",", ":"), default=str).encode()
        sent = self._send(fw.encode_status(data), must=False)
        # Trimmed, the frontend's copy is not the status: the next one is sent whole again.
        self.sent = whole if sent and status is whole else None

    def receive(self) -> list[fw.Done]:
        out: list[fw.Done] = []
        while True:
            try:
                data, _ = records.receive(self.sock, fw.MAX_RECORD)  # no descriptors
            except BlockingIOError:
                return out
            except records.RecordError as e:
                raise FrontendGone(f"the frontend sent {e}") from None
            except OSError as e:
                raise FrontendGone(f"reading from the frontend failed: {e.strerror}") from None
            if not data:
                raise FrontendGone("the frontend closed its link")
            try:
                msg = fw.decode_frontend(data)
            except fw.WireError as e:
                raise FrontendGone(f"malformed record from the frontend: {e}") from None
            if isinstance(msg, fw.Hearing):
                self.hearing = msg.count
            else:
                out.append(msg)

    def _send(self, record: bytes, must: bool) -> bool:
        """False if the record was dropped."""
        try:
            self.sock.send(record)
        except BlockingIOError:
            # The frontend is not reading.  A status can wait for the next one; an event
            # cannot, and the engine's own deadline then applies the policy.
            log.warning("the frontend is not reading: %s dropped",
                        "an event" if must else "a status update")
            return False
        except OSError as e:
            raise FrontendGone(f"cannot write to the frontend: {e.strerror}") from None
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Closing the link is the frontend's cue to exit."""
        self.sock.close()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(1.0)

