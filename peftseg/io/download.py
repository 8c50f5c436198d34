"""Fetching a weights file from a URL, with timeouts.

detectron2 downloads `model.weights=http(s)://…` and `detectron2://…` through iopath, whose
`download` calls urlopen without a timeout: a server that accepts the connection and never
answers hangs the run forever. This module does the same download (into iopath's cache
folder, under the same host/path names, so files either one fetched are reused) with
connect and read timeouts and an error that says how to fetch the file by hand.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from peftseg.errors import UserError

TIMEOUT_S = 60.0  # per connect and per read of a chunk: a slow link still gets there
_DETECTRON2 = "detectron2://"
_DETECTRON2_HOST = "https://dl.fbaipublicfiles.com/detectron2/"  # detectron2.utils.file_io's mapping


def cache_dir() -> Path:
    from iopath.common.file_io import get_cache_dir  # $FVCORE_CACHE or ~/.torch/iopath_cache

    return Path(get_cache_dir())


def http_url(url: str) -> str:
    """The http(s) address of a weights URL (detectron2:// resolved), without its query."""
    base = urlparse(url)._replace(query="").geturl()
    if base.startswith(_DETECTRON2):
        base = _DETECTRON2_HOST + base[len(_DETECTRON2):]
    if urlparse(base).scheme not in ("http", "https"):
        raise UserError(
            f"model.weights={url!r} uses a URL scheme peftseg cannot fetch; give an http(s):// or "
            "detectron2:// URL, or download the file yourself and give its local path."
        )
    return base


def fetch(url: str, timeout: float | None = None) -> Path:
    """Local copy of `url` (downloaded once, atomically); UserError when it cannot be had."""
    timeout = TIMEOUT_S if timeout is None else timeout
    address = http_url(url)
    parsed = urlparse(address)
    local = cache_dir() / parsed.netloc / parsed.path.lstrip("/")
    if local.is_file():
        return local
    by_hand = (f"download it by hand (e.g. `curl -L -o {Path(parsed.path).name} {address}`) and set "
               f"model.weights=<that file>")
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
    try:
        # urlopen's timeout bounds the connect and every blocking read of the body
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(address, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(tmp, local)
    except urllib.error.HTTPError as e:
        raise UserError(f"model.weights={url!r}: the server answered HTTP {e.code} ({e.reason}); check the "
                        f"URL, or {by_hand}.") from None
    except OSError as e:  # URLError, timeouts, refused connections, a full disk
        reason = getattr(e, "reason", e)
        # urlopen wraps a connect timeout in URLError; a read timeout comes bare
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise UserError(
                f"model.weights={url!r}: {parsed.netloc} did not answer within {timeout:g} s; the server "
                f"is down, slow or unreachable from this machine. Try again later, or {by_hand}."
            ) from None
        raise UserError(f"model.weights={url!r} could not be downloaded ({reason}); check the URL and the "
                        f"network, or {by_hand}.") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return local
