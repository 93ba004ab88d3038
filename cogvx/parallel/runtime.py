"""Process groups for multi-rank inference, and failure handling that never hangs.

    init_process_group("cuda")     # from torchrun's environment: NCCL (one GPU per LOCAL_RANK) or gloo
    with FailureGuard() as guard:  # heartbeats; any failure ends every rank, naming the failed one
        ...

- Every collective has a timeout: `init_process_group` passes COGVX_DIST_TIMEOUT seconds (default
  600) and `set_timeout` gives the mesh's groups the same, so a rank that stops answering turns
  into an error on the others instead of a hang.
- `FailureGuard`: a background thread beats through the rendezvous store (a TCPStore client of its
  own) every HEARTBEAT seconds. An exception on a rank is either its own failure — it reports
  "rank R failed: ..." to the store, says so on stderr, aborts its process group and exits 1 — or a
  communication error caused by another rank (a peer that exited or was killed closes its
  connections; a stuck one times out): then the rank names the failed one from the store's reports,
  or else from the heartbeats that stopped, and exits 1 the same way. The heartbeat thread also
  watches the reports, so a rank blocked in a collective that would only time out (NCCL does not
  notice a dead peer) exits as soon as another rank has reported. A rank whose collective times out
  while every rank is alive (one is stuck) reports that, so the stuck one is ended too.
- The store lives in the torchrun agent, or, under a plain env:// launch, in rank 0: there rank 0
  leaves last (it waits, bounded, for the others to stop or finish), and a rank that loses the store
  for two heartbeats ends itself, saying its host is gone.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "COGVX_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds: the longest a healthy rank may wait for the others (loading included)
HEARTBEAT = 0.5          # seconds between heartbeats
SILENCE = 7              # heartbeats looked at before a rank is named as gone (3 s)
_PREFIX = "cogvx/"


def world_size() -> int:
    """The launch's world size (torchrun's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def timeout() -> timedelta:
    """The collectives' timeout: COGVX_DIST_TIMEOUT seconds (a positive number), default 600."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return timedelta(seconds=DEFAULT_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {text!r}")
    return timedelta(seconds=seconds)


def init_process_group(device_type: str) -> bool:
    """Initialise the default process group from the launcher's environment (env://) unless it is
    already: NCCL for "cuda" (this rank's GPU is LOCAL_RANK), gloo otherwise, with `timeout()`.
    Returns whether it initialised it (then the caller owns it)."""
    if dist.is_initialized():
        return False
    limit = timeout()
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=limit, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=limit)
    return True


def set_timeout(group) -> None:
    """Give a group made by DeviceMesh (which creates its groups with torch's default timeout) the
    collectives' timeout."""
    if hasattr(dist, "set_timeout"):  # torch >= 2.10
        dist.set_timeout(timeout(), group)
    else:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timeout(), group)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def is_communication_error(exc: BaseException) -> bool:
    """An error raised by a collective because of another rank (closed connection, timeout) rather
    than by this rank's own work."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in (
        "gloo/transport", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
        "NCCL communicator was aborted", "ProcessGroupNCCL", "Broken pipe"))


def _store_client():
    """A TCPStore client of the launch's rendezvous store (torchrun's agent store, or the one rank 0
    hosts under a plain env:// launch); torch's default store when the address is unknown."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def abort_process_group() -> None:
    """Abort the default process group without waiting for pending collectives (NCCL's may block
    forever otherwise); a no-op where the backend has nothing to abort."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # gloo: nothing to abort; the process exit closes its connections
        pass


class FailureGuard:
    """Context manager for the body of a multi-rank run (see the module docstring). Exceptions in
    `passthrough` (e.g. usage errors every rank raises alike) are reported to the store for the
    others and re-raised for the caller to print; every other exception ends the process with exit
    status 1 after one `cogvx: error:` line naming the failed rank."""

    def __init__(self, *, passthrough: tuple[type[BaseException], ...] = ()):
        self.passthrough = passthrough
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        agent = bool(os.environ.get("TORCHELASTIC_USE_AGENT_STORE"))
        self.store_host = "the torchrun agent" if agent else "rank 0"
        self.hosts_store = not agent and self.rank == 0 and bool(os.environ.get("MASTER_ADDR"))
        self._exiting = threading.Lock()
        self._stop = threading.Event()
        self._lost = threading.Event()  # the store failed once: its host is gone, do not wait on it again
        self._beats = 0
        self._store = _store_client()        # the main thread's
        self._beat_store = _store_client()   # the heartbeat thread's (a client is not shared between threads)
        self._thread = threading.Thread(target=self._heartbeat, name="cogvx-heartbeat", daemon=True)

    def __enter__(self) -> "FailureGuard":
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            self._leave(timeout().total_seconds(), self._store)
            return False
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or the launcher's SIGTERM after another rank failed
            reports = self._safely(lambda: self._reports(self._store), {})
            if reports:
                rank, message = min(reports.items())
                self._exit(f"cogvx: error: rank {rank} failed: {message}; rank {self.rank} stops (terminated)")
            self._leave(0, self._store)
            return False
        if isinstance(exc, self.passthrough):  # raised alike on every rank, as a rule: the caller prints it
            self._report(_first_line(exc), "usage")
            self._leave(SILENCE * HEARTBEAT, self._store)
            return False
        if is_communication_error(exc):
            failed = self._find_failed()
            if failed is None:  # every rank alive: one is stuck; say so to the others, who may be waiting on us
                failed = (f"rank {self.rank} failed: a collective timed out or broke while every rank was alive "
                          f"(a rank is stuck; {TIMEOUT_ENV}={timeout().total_seconds():g} s)")
                self._report(failed.split(": ", 1)[1], "failed")
            self._exit(f"cogvx: error: {failed}; rank {self.rank} stops ({_first_line(exc)})")
        traceback.print_exception(kind, exc, tb, file=sys.stderr)
        self._report(_first_line(exc), "failed")
        self._exit(f"cogvx: error: rank {self.rank} failed: {_first_line(exc)}")

    # -- the store: reports, heartbeats, leaving ----------------------------------------------------------
    def _safely(self, action, default=None):
        if self._lost.is_set():
            return default
        try:
            return action()
        except Exception:  # the store (or its host) is gone
            self._lost.set()
            return default

    def _report(self, message: str, kind: str) -> None:
        """kind "failed": this rank's own failure (the others stop at once); "usage": an error every
        rank raises alike (named only by a rank whose collective then fails)."""
        def report():
            self._store.set(f"{_PREFIX}{kind}/{self.rank}", message)
            self._store.add(f"{_PREFIX}{kind}", 1)
        self._safely(report)  # without a store the others name us by our silence

    def _reports(self, store, kind: str = "failed") -> dict[int, str]:
        if int(store.add(f"{_PREFIX}{kind}", 0)) == 0:
            return {}
        keys = {r: f"{_PREFIX}{kind}/{r}" for r in range(self.world) if r != self.rank}
        return {r: store.get(key).decode(errors="replace") for r, key in keys.items() if store.check([key])}

    def _heartbeat(self) -> None:
        lost = 0
        while not self._stop.wait(HEARTBEAT):
            try:
                self._beats += 1
                self._beat_store.set(f"{_PREFIX}beat/{self.rank}", str(self._beats))
                reports = self._reports(self._beat_store)
                lost = 0
            except Exception:
                lost += 1
                if lost >= 2 and not self._stop.is_set():
                    self._lost.set()
                    self._exit(f"cogvx: error: the rendezvous store is unreachable: {self.store_host} (its host) is "
                               f"gone; rank {self.rank} stops", self._beat_store)
                continue
            if reports:  # another rank failed: do not wait for a collective that may only time out
                rank, message = min(reports.items())
                self._exit(f"cogvx: error: rank {rank} failed: {message}; rank {self.rank} stops", self._beat_store)

    def _find_failed(self) -> str | None:
        """Who failed: a rank that reported (waiting a little for a report in flight), else the ranks
        whose heartbeats stopped over SILENCE heartbeats; None when every rank is alive."""
        others = [r for r in range(self.world) if r != self.rank]
        last, unchanged = {}, dict.fromkeys(others, 0)
        store = self._store
        try:
            if self._lost.is_set():
                raise ConnectionError("the store was lost")
            for _ in range(SILENCE):
                for kind in ("failed", "usage"):
                    reports = self._reports(store, kind)
                    if reports:
                        rank, message = min(reports.items())
                        return f"rank {rank} failed: {message}"
                for r in others:
                    key = f"{_PREFIX}beat/{r}"
                    value = store.get(key) if store.check([key]) else b""
                    unchanged[r] = unchanged[r] + 1 if last.get(r) == value else 0
                    last[r] = value
                time.sleep(HEARTBEAT)
        except Exception:
            self._lost.set()
            return f"the rendezvous store is unreachable: {self.store_host} (its host) is gone"
        silent = [r for r in others if unchanged[r] >= SILENCE - 1]
        if silent:
            return (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped responding "
                    f"(killed or crashed: no heartbeat for {(SILENCE - 1) * HEARTBEAT:.1f} s)")
        return None

    def _leave(self, wait: float, store) -> None:
        """Stop beating and mark this rank out. The store's host waits, up to `wait` seconds, until
        every other rank is out or silent (killed) for SILENCE heartbeats: they may still need the
        store (to read a report, to beat)."""
        self._stop.set()
        self._safely(lambda: store.set(f"{_PREFIX}out/{self.rank}", "1"))
        if not self.hosts_store:
            return
        deadline = time.monotonic() + wait
        waiting = {r: (None, 0) for r in range(self.world) if r != self.rank}  # rank -> (last beat, unchanged polls)
        while waiting and time.monotonic() < deadline:
            for r, (last, unchanged) in list(waiting.items()):
                if self._safely(lambda: store.check([f"{_PREFIX}out/{r}"]), True):
                    del waiting[r]
                    continue
                beat = self._safely(lambda: store.get(f"{_PREFIX}beat/{r}") if store.check([f"{_PREFIX}beat/{r}"])
                                    else b"")
                unchanged = unchanged + 1 if beat == last else 0
                if unchanged >= SILENCE:
                    del waiting[r]
                else:
                    waiting[r] = (beat, unchanged)
            time.sleep(HEARTBEAT)

    def _exit(self, message: str, store=None) -> None:
        """Say `message`, abort the process group, leave (the store's host waits for the others) and
        exit 1; `store`: the calling thread's client (the main thread's by default)."""
        if not self._exiting.acquire(blocking=False):  # the other thread is already ending the process
            threading.Event().wait()
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        abort_process_group()
        self._leave(2 * SILENCE * HEARTBEAT, self._store if store is None else store)
        os._exit(1)
