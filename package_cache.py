"""A folder of built files, each kept under a key, that no crash, kill or race can break.

decode_package.py keeps its compiled decode steps here. Each entry is a zip archive (an
AOTInductor package is one) with a small record of ours inside it, `FORMAT_ENTRY`, naming the
entry's key and the cache's format:
- an entry that is empty, truncated, corrupt (a zip CRC that fails) or of another format is
  removed with a one-line note and built again;
- a build writes to `.<pid>.<name>` and renames when complete; a kill leaves that temporary
  behind, and the next build removes every one whose process is gone;
- builds take a lock on the folder (fcntl), so two processes that want the same key build it
  once: the second finds it built when the lock is its turn;
- the folder stays under a size bound: the least recently used entries go first.
"""
import fcntl
import json
import os
import shutil
import sys
import zipfile
from contextlib import contextmanager

# bump when what an entry holds changes meaning: older entries are then rebuilt, not loaded
CACHE_FORMAT = 2
FORMAT_ENTRY = "storyteller_package.json"
LOCK_NAME = ".build.lock"


class EntryRefused(Exception):
    """An entry that is not the complete, current thing its key names."""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class PackageCache:
    """Entries `<key><suffix>` in folder, at most max_bytes in all (None: no bound)."""

    def __init__(self, folder, max_bytes=None, suffix=".pt2", stream=None):
        self.folder, self.max_bytes, self.suffix = folder, max_bytes, suffix
        self.stream = stream or sys.stderr

    def path(self, key) -> str:
        return os.path.join(self.folder, key + self.suffix)

    def failed_marker(self, key) -> str:
        return os.path.join(self.folder, key + ".failed")

    def check(self, path, key):
        """Raise EntryRefused unless path is a whole zip whose record names key and this format."""
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # reads every member: the CRCs catch corrupt bytes
                if bad is not None:
                    raise EntryRefused(f"corrupt ({bad} fails its checksum)")
                record = json.loads(archive.read(FORMAT_ENTRY))
        except KeyError:
            raise EntryRefused("not one of ours (no format record)") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            raise EntryRefused("empty" if size == 0 else f"not a complete package ({exc})") from None
        if record.get("format") != CACHE_FORMAT or record.get("key") != key:
            raise EntryRefused(f"of another format or key ({record})")

    def load(self, key, opener):
        """opener(path) for key's entry; None when there is none. A broken entry is removed with
        a note (so the caller builds it again), as is one that opener refuses."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            self.check(path, key)
            loaded = opener(path)
        except (EntryRefused, RuntimeError, OSError) as exc:
            print(f"note: the cached package {path} is {exc}; building it again", file=self.stream)
            remove(path)
            return None
        os.utime(path)  # its last use, for evict's least-recently-used order
        return loaded

    def get(self, key, builder, opener):
        """opener(path) of key's entry, built first by builder(temporary path) -> bool when
        missing or broken. A False from builder (it could not make a good entry) leaves a
        marker, so that later calls do not build in vain: they get None."""
        os.makedirs(self.folder, exist_ok=True)
        loaded = self.load(key, opener)
        if loaded is not None:
            return loaded
        with self.build_lock():
            self.clean_temporaries()
            loaded = self.load(key, opener)  # another process may have built it while we waited
            if loaded is not None:
                return loaded
            if os.path.exists(self.failed_marker(key)):
                return None
            path = self.path(key)
            tmp = os.path.join(self.folder, f".{os.getpid()}.{key}{self.suffix}")
            try:
                if not builder(tmp):
                    open(self.failed_marker(key), "w").close()
                    return None
                with zipfile.ZipFile(tmp, "a") as archive:
                    archive.writestr(FORMAT_ENTRY, json.dumps({"format": CACHE_FORMAT, "key": key}))
                os.replace(tmp, path)
            finally:
                remove(tmp)
            self.evict(keep=path)
        return opener(path)

    def building(self) -> bool:
        """Whether some process holds the build lock now."""
        if not os.path.isdir(self.folder):
            return False
        with open(os.path.join(self.folder, LOCK_NAME), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False

    @contextmanager
    def build_lock(self):
        # the kernel drops an flock when its process dies, so a killed build never blocks the next
        with open(os.path.join(self.folder, LOCK_NAME), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def clean_temporaries(self):
        """Remove `.<pid>.*` files and folders whose process is gone (a build that was killed)."""
        for name in os.listdir(self.folder):
            pid = name.split(".")[1] if name.startswith(".") and name.count(".") >= 2 else ""
            if pid.isdigit() and (int(pid) == os.getpid() or not process_alive(int(pid))):
                remove(os.path.join(self.folder, name))

    def entries(self):
        """(last use, size, path) of each entry, least recently used first."""
        found = []
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.endswith(self.suffix) and not name.startswith("."):
                stat = os.stat(path)
                found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def evict(self, keep=None):
        """Remove the least recently used entries until the folder is within max_bytes; keep
        (the entry just built) stays even when it alone is larger."""
        if self.max_bytes is None:
            return
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path != keep:
                remove(path)
                total -= size


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
