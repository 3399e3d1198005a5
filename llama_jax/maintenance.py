"""GCE host-maintenance notices as preemption: TPU VMs and GPU VMs cannot live-migrate, so Compute Engine stops them
for host maintenance, announcing it about 60 s ahead in the metadata server's `instance/maintenance-event` key. A
thread watches that key and, on a notice, calls back so the trainer saves at the next step boundary and exits as
it would on SIGTERM.

`checkpoint.maintenance_url`: "auto" watches the metadata server on Compute Engine VMs only (read from the BIOS's
product name, with no network call elsewhere); "" never; any other value is the URL to watch (tests, proxies).
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event"
_QUIET = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE")  # nothing due, or a live migration the run does not notice
_PRODUCT_NAME = Path("/sys/class/dmi/id/product_name")
_MIN_INTERVAL = 1.0  # seconds between requests, whatever the server does with wait_for_change
_WAIT_SECONDS = 60  # how long one wait_for_change request may be held open by the server
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the metadata server is never behind a proxy


def maintenance_url(setting: str) -> str | None:
    """The URL to watch for `checkpoint.maintenance_url`, or None."""
    if setting != "auto":
        return setting or None
    try:
        on_gce = _PRODUCT_NAME.read_text().strip() == "Google Compute Engine"
    except OSError:
        on_gce = False
    return METADATA_URL if on_gce else None


class MaintenanceWatch:
    """A daemon thread: `on_notice(event)` once, when the key leaves NONE for a maintenance that stops the VM."""

    def __init__(self, url: str, on_notice: Callable[[str], None]):
        self.url, self.on_notice = url, on_notice
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="maintenance-watch", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        etag, warned = None, False
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                event, etag = _read(self.url, etag)
            except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
                if not warned:
                    print(f"warning: cannot read maintenance notices from {self.url} ({err}); retrying every "
                          f"{_MIN_INTERVAL:g} s. Set checkpoint.maintenance_url='' if this machine has none.",
                          file=sys.stderr, flush=True)
                    warned = True
                event = "NONE"
            if event not in _QUIET and not self._stopped.is_set():
                self.on_notice(event)
                return
            self._stopped.wait(max(0.0, _MIN_INTERVAL - (time.monotonic() - started)))


def _read(url: str, etag: str | None) -> tuple[str, str | None]:
    """(value, ETag). With an ETag the server holds the request until the value changes (or _WAIT_SECONDS pass)."""
    query = "" if etag is None else f"?wait_for_change=true&timeout_sec={_WAIT_SECONDS}&last_etag={etag}"
    request = urllib.request.Request(url + query, headers={"Metadata-Flavor": "Google"})
    with _DIRECT.open(request, timeout=_WAIT_SECONDS + 10) as response:
        return response.read().decode().strip(), response.headers.get("ETag")
