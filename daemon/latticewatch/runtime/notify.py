"""systemd's notification protocol (``sd_notify``), written to ``$NOTIFY_SOCKET`` directly: no dependency.

The daemon says ``READY=1`` once its sources, models and outputs are up, ``WATCHDOG=1`` at half of
``WatchdogSec=`` while its pipeline makes progress or is idle (`latticewatch.runtime.daemon`
decides), ``STATUS=…`` lines (fps, backlog, last frame) and ``STOPPING=1`` on shutdown. Each is one
datagram of ``KEY=value`` lines on an ``AF_UNIX`` socket; an address starting with ``@`` is in the
abstract namespace. Outside systemd (no ``$NOTIFY_SOCKET``) `Notifier.from_env` gives ``None``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """The service manager's notification socket.

    Parameters
    ----------
    address
        ``$NOTIFY_SOCKET``: a path, or ``@name`` for the abstract namespace.
    watchdog_s
        ``$WATCHDOG_USEC`` in seconds, when the watchdog is on for this process; pings are due at half of it.

    Examples
    --------
    >>> import socket, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "notify")
    >>> manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); manager.bind(path)
    >>> Notifier(path).notify(READY=1, STATUS="up")
    True
    >>> manager.recv(100)
    b'READY=1\\nSTATUS=up'
    """

    def __init__(self, address: str, *, watchdog_s: float | None = None) -> None:
        # "@name" is "\0name": Linux's abstract namespace, which Python takes as a str starting with NUL
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd set up for this process, or ``None`` when not started by ``Type=notify``.

        Examples
        --------
        >>> Notifier.from_env({}) is None
        True
        >>> Notifier.from_env({"NOTIFY_SOCKET": "@lw", "WATCHDOG_USEC": "30000000"}).ping_interval_s
        15.0
        """
        address = environ.get("NOTIFY_SOCKET", "")
        if not address.startswith(("/", "@")):  # unset, or a kind (vsock:…) this daemon does not speak
            if address:
                log.warning("NOTIFY_SOCKET=%s: only AF_UNIX paths and @abstract names are supported", address)
            return None
        watchdog_s = None
        pid = environ.get("WATCHDOG_PID")
        if environ.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            watchdog_s = int(environ["WATCHDOG_USEC"]) / 1e6 or None
        return cls(address, watchdog_s=watchdog_s)

    @property
    def ping_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half its timeout, as systemd recommends); ``None``: no watchdog."""
        return self.watchdog_s / 2 if self.watchdog_s else None

    def notify(self, **fields: object) -> bool:
        """Send one message of ``KEY=value`` lines; False (logged once) when the manager cannot be reached."""
        message = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self.address)
        except OSError as err:
            if not self._failed:
                log.warning("cannot notify the service manager at %s: %s", self.address.replace("\0", "@"), err)
                self._failed = True
            return False
        return True

    def close(self) -> None:
        self._socket.close()
