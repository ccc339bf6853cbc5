"""A tiny HTTP server on 127.0.0.1 that serves files from memory, for download tests.

    with LocalDataServer({"a.gz": data}) as server:
      server.url                # 'http://127.0.0.1:PORT/'
      server.truncate["a.gz"] = 100  # send only 100 bytes under the full Content-Length
      server.requests           # paths asked for, in order

Runs `http.server` in a thread on port 0 (a free port); it binds to loopback
only, so tests never reach another machine.
"""
import http.server
import threading
from typing import Dict, List


class LocalDataServer:
  """Serves `files` (name -> bytes) at http://127.0.0.1:PORT/<name>; 404 otherwise.

  Arguments:
    files: the file contents by name.
  """

  def __init__(self, files: Dict[str, bytes]):
    self.files = dict(files)
    self.truncate: Dict[str, int] = {}  # name -> bytes actually sent before closing
    self.requests: List[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        name = self.path.lstrip("/")
        server.requests.append(name)
        if name not in server.files:
          self.send_error(404)
          return
        data = server.files[name]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))  # the full size, even when cut
        self.end_headers()
        self.wfile.write(data[:server.truncate.get(name, len(data))])
        self.wfile.flush()
        self.close_connection = True  # A cut file ends with the connection closed.

      def log_message(self, *args):  # Keep the test output clean.
        pass

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
    self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

  def __enter__(self) -> "LocalDataServer":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join()
