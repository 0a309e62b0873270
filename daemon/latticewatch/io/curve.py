"""ZeroMQ CURVE: encryption and key-based authentication for the stream source and the event publisher.

The daemon is always the CURVE *server* (whether it binds or connects): it holds a secret key and
accepts only peers whose public key is in a directory of allowed client keys. Peers (stream
senders, event subscribers) are CURVE *clients*: they hold their own key pair and the daemon's
public key. Keys are the ZeroMQ certificate files pyzmq writes (`zmq.auth.create_certificates`)::

    python -c "import zmq.auth; zmq.auth.create_certificates('keys', 'daemon')"   # keys/daemon.key(_secret)
    python -c "import zmq.auth; zmq.auth.create_certificates('keys', 'camera')"   # keys/camera.key(_secret)
    mkdir -p keys/clients && cp keys/camera.key keys/clients/                     # allow the camera

The daemon's config then names ``keys/daemon.key_secret`` and ``keys/clients``; the camera uses
``keys/camera.key_secret`` and ``keys/daemon.key``. A peer without an allowed key never completes
the handshake: ZeroMQ drops its connection, nothing of it reaches the daemon.

Authentication runs in one ZAP handler thread per ZeroMQ context (`zmq.auth.thread.ThreadAuthenticator`);
each server socket gets its own ZAP domain, so the stream source and the publisher can allow different keys.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from latticewatch.errors import ConfigError

log = logging.getLogger(__name__)

_authenticators: dict[int, ThreadAuthenticator] = {}
_lock = threading.Lock()


def _authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """The context's ZAP handler, started once (ZeroMQ allows one per context)."""
    with _lock:
        auth = _authenticators.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
            auth.start()
            _authenticators[id(context)] = auth
        return auth


def _key_pair(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a ZeroMQ certificate file: {err}") from None
    if secret and secret_key is None:
        raise ConfigError(f"{path}: holds no secret key (the '.key_secret' file of zmq.auth.create_certificates)")
    return public, secret_key


def curve_server(sock: zmq.Socket, *, secret_key_file: Path, clients_dir: Path, domain: str) -> None:
    """Make ``sock`` (before it binds or connects) a CURVE server accepting only the keys in ``clients_dir``.

    Raises `ConfigError` naming the file or directory when a key cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> keys = Path(tempfile.mkdtemp()); (keys / "clients").mkdir()
    >>> _ = zmq.auth.create_certificates(keys, "daemon")
    >>> sock = zmq.Context.instance().socket(zmq.PULL)
    >>> curve_server(sock, secret_key_file=keys / "daemon.key_secret", clients_dir=keys / "clients", domain="doc")
    >>> sock.curve_server
    1
    >>> sock.close()
    """
    public, secret = _key_pair(Path(secret_key_file), secret=True)
    clients_dir = Path(clients_dir)
    if not clients_dir.is_dir():
        raise ConfigError(f"{clients_dir}: not a directory of allowed client public keys")
    allowed = sorted(p.name for p in clients_dir.glob("*.key"))
    if not allowed:
        log.warning("%s: no client public keys (*.key): no peer can connect", clients_dir)
    _authenticator(sock.context).configure_curve(domain=domain, location=str(clients_dir))
    sock.zap_domain = domain.encode()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    log.info("ZeroMQ CURVE on (domain %s): %d allowed client key(s) in %s", domain, len(allowed), clients_dir)


def curve_client(sock: zmq.Socket, *, secret_key_file: Path, server_key_file: Path) -> None:
    """Make ``sock`` (before it binds or connects) a CURVE client of the server whose public key is given.

    Examples
    --------
    >>> import tempfile
    >>> keys = Path(tempfile.mkdtemp())
    >>> _ = zmq.auth.create_certificates(keys, "daemon"); _ = zmq.auth.create_certificates(keys, "camera")
    >>> sock = zmq.Context.instance().socket(zmq.PUSH)
    >>> curve_client(sock, secret_key_file=keys / "camera.key_secret", server_key_file=keys / "daemon.key")
    >>> sock.mechanism == zmq.CURVE
    True
    >>> sock.close()
    """
    public, secret = _key_pair(Path(secret_key_file), secret=True)
    server_public, _ = _key_pair(Path(server_key_file), secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public
