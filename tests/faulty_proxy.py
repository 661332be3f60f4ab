"""An HTTP proxy on 127.0.0.1 that fails a seeded share of the requests it forwards, for tests
of the storage layer's retries (tests/test_nothing_lost.py):

  with faulty_proxy.FaultyProxy("http://127.0.0.1:PORT", share=0.1, seed=0) as proxy:
    ... clients pointed at proxy.url ...
    proxy.faults  # {"error": n, "drop": n, "slow": n, "lost_reply": n}: what was injected

A failed request is one of: an error reply (500 or 503) without forwarding it; a dropped
connection (closed with no reply, before forwarding); a slow reply (forwarded after a pause);
a lost reply (forwarded, carried out upstream, then the connection closed with no reply).
Everything else is forwarded as it came (one upstream connection per request) and the reply
passed back whole.
"""
import collections
import http.client
import http.server
import random
import socketserver
import threading
import time
import urllib.parse

KINDS = ("error", "drop", "slow", "lost_reply")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te",
               "trailer", "upgrade", "host", "content-length"}


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True


class FaultyProxy:
  """Context manager: the proxy serves on a free port of 127.0.0.1 in a thread."""

  def __init__(self, upstream: str, share: float, seed: int, slow_s: float = 1.0, kinds=KINDS,
               methods=None, max_faults=None):
    """Fails `share` of the requests (of those whose method is in `methods`, all if None) with
    faults drawn from `kinds`, `max_faults` at most."""
    self.upstream = urllib.parse.urlsplit(upstream)
    self.share, self.slow_s, self.kinds, self.methods = share, slow_s, kinds, methods
    self.max_faults = max_faults
    self._random = random.Random(seed)
    self._lock = threading.Lock()
    self.requests = 0
    self.faults = collections.Counter()
    self._server = _Server(("127.0.0.1", 0), self._handler())
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

  def _fault(self, method: str) -> tuple[str | None, int]:
    """(the fault to inject or None, the error status if it is an error reply)."""
    with self._lock:
      self.requests += 1
      if (self._random.random() >= self.share or (self.methods and method not in self.methods)
          or (self.max_faults is not None and sum(self.faults.values()) >= self.max_faults)):
        return None, 0
      kind = self._random.choice(self.kinds)
      self.faults[kind] += 1
      return kind, self._random.choice((500, 503))

  def _handler(self):
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect

      def log_message(self, *args):
        pass

      def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          body = b""
          while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            chunk = self.rfile.read(size + 2)[:size]  # and its CRLF
            if not size:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
              return body
            body += chunk
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

      def _forward(self):
        body = self._body()
        fault, status = proxy._fault(self.command)
        if fault == "drop":
          self.close_connection = True
          self.connection.shutdown(2)  # no reply at all
          return
        if fault == "error":
          payload = b'{"error": {"code": %d, "message": "injected by the faulty proxy"}}' % status
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        if fault == "slow":
          time.sleep(proxy.slow_s)
        upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
        try:
          headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
          headers["Host"] = proxy.upstream.netloc
          upstream.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                           else None, headers=headers)
          reply = upstream.getresponse()
          payload = reply.read()
        finally:
          upstream.close()
        if fault == "lost_reply":  # done upstream, but the client never hears of it
          self.close_connection = True
          self.connection.shutdown(2)
          return
        self.send_response(reply.status, reply.reason)
        for k, v in reply.getheaders():
          if k.lower() not in _HOP_BY_HOP:
            self.send_header(k, v)
        if self.command != "HEAD":
          self.send_header("Content-Length", str(len(payload)))
        elif reply.getheader("Content-Length") is not None:
          self.send_header("Content-Length", reply.getheader("Content-Length"))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(payload)

      def handle(self):
        try:
          super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client closed the connection first
          pass

      do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    return Handler

  def __enter__(self):
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()
