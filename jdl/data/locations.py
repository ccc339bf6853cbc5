"""Where jdl keeps data, where it downloads from, and a fast network probe.

- `cache_dir()`: jdl's data cache, $JDL_DATA_CACHE or ~/.cache/jdl/data
  (downloads of the classic datasets, the generated MNIST-1D arrays).
- `mirror()`: $JDL_DATA_MIRROR, a base URL such as http://127.0.0.1:8000/ that
  replaces the directory of every download URL of `jdl.data.classic`. The TFDS
  path's network probe also asks it first (a mirror that does not answer means
  offline), so tests that point it at a dead loopback port never reach out.
- `host_answers(url)`: opens one TCP connection to the URL's host with a short
  timeout, so an offline machine is told so in seconds, not after retries.
"""
import os
import socket
import urllib.parse
from typing import Optional

# Seconds to wait for a TCP connection before calling a host unreachable.
NETWORK_TIMEOUT_S = 3.0

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def cache_dir() -> str:
  """jdl's data cache: $JDL_DATA_CACHE, default ~/.cache/jdl/data (`~` expanded)."""
  return os.path.expanduser(os.environ.get("JDL_DATA_CACHE") or "~/.cache/jdl/data")


def mirror() -> Optional[str]:
  """The download base URL from $JDL_DATA_MIRROR, or None when unset or empty."""
  return os.environ.get("JDL_DATA_MIRROR") or None


def host_answers(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
  """True if a TCP connection to `url`'s host and port opens within `timeout` seconds.

  Arguments:
    url: any URL; the port is its explicit one or the scheme's default (https: 443).
    timeout: seconds before giving up.
  """
  parts = urllib.parse.urlparse(url)
  if not parts.hostname:
    return False
  try:
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
    socket.create_connection((parts.hostname, port), timeout=timeout).close()
    return True
  except (OSError, ValueError):  # ValueError: a port outside 0..65535 in the URL.
    return False
