"""Loads a local HTML page in headless Chromium over the DevTools protocol (no internet).

`check_page` returns the console errors, every image's (alt, naturalWidth) and writes a
full-page screenshot. Chromium is Debian's `chromium` package (.ci/run installs it).
"""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import portpicker
import websocket


def chromium_binary() -> str:
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if not found:
    raise AssertionError("chromium is not installed: the HTML report test needs a real browser "
                         "(apt-get update && apt-get install -y chromium; .ci/run does it).")
  return found


def _page_socket(port: int, deadline: float) -> str:
  while True:
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
        pages = [t for t in json.load(r) if t.get("type") == "page"]
      if pages:
        return pages[0]["webSocketDebuggerUrl"]
    except OSError:
      pass
    if time.time() > deadline:
      raise AssertionError(f"chromium did not open its DevTools port {port} in time.")
    time.sleep(0.2)


class _Session:
  """Commands and events of one page over its DevTools websocket."""

  def __init__(self, url: str, deadline: float):
    self._ws = websocket.create_connection(url, timeout=max(1.0, deadline - time.time()))
    self._next_id = 0
    self.events = []

  def call(self, method: str, **params) -> dict:
    self._next_id += 1
    self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
    while True:
      message = json.loads(self._ws.recv())
      if message.get("id") == self._next_id:
        if "error" in message:
          raise AssertionError(f"DevTools {method}: {message['error']}")
        return message.get("result", {})
      self.events.append(message)

  def wait_for(self, method: str) -> None:
    while not any(e.get("method") == method for e in self.events):
      self.events.append(json.loads(self._ws.recv()))

  def close(self):
    self._ws.close()


def _errors(events) -> list[str]:
  errors = []
  for e in events:
    p = e.get("params", {})
    if e.get("method") == "Runtime.exceptionThrown":
      errors.append(p["exceptionDetails"].get("text", "exception"))
    elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
      errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
    elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
      errors.append(p["entry"].get("text", ""))
  return errors


def check_page(html_path: str, screenshot_path: str, *, width: int = 1400,
               timeout: float = 90.0) -> dict:
  """{"errors": [...], "images": [(alt, naturalWidth)], "height": page height} of the loaded page."""
  deadline = time.time() + timeout
  port = portpicker.pick_unused_port()
  with tempfile.TemporaryDirectory() as profile:
    proc = subprocess.Popen(
        [chromium_binary(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
         "--remote-debugging-address=127.0.0.1", f"--window-size={width},1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      session = _Session(_page_socket(port, deadline), deadline)
      for domain in ("Page", "Runtime", "Log"):
        session.call(f"{domain}.enable")
      session.call("Page.navigate", url="file://" + os.path.abspath(html_path))
      session.wait_for("Page.loadEventFired")
      images = json.loads(session.call(
          "Runtime.evaluate", returnByValue=True,
          expression="JSON.stringify(Array.from(document.images).map("
                     "i => [i.alt, i.complete ? i.naturalWidth : 0]))")["result"]["value"])
      size = session.call("Page.getLayoutMetrics")["cssContentSize"]
      shot = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                                "scale": 1})
      with open(screenshot_path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
      errors = _errors(session.events)
      session.close()
    finally:
      proc.terminate()
      proc.wait(timeout=30)
  return {"errors": errors, "images": [tuple(i) for i in images], "height": size["height"]}
