"""What every script of the toolkit shares: one-line errors with one exit-code rule, the
argument parser that reports misuse in one line, dtype and device names, and files written
under a temporary name and renamed, so that no reader ever sees half a file.

The exit-code rule: 2 when what the user typed is wrong (a flag, a setting, or a file or
folder it names: UsageError, and the loader's CheckpointError); 1 when a step of the data
pipeline cannot finish (DataError: a download that fails, an earlier step's output missing)
or a run has to stop (train.py's TrainingError). Every script's main() ends in report_error.

torch is imported inside the functions that need it: the data-preparation workers import
this module and should not pay for torch.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile


class ToolError(Exception):
    """An error the user sees as one line; its class says the exit code."""
    exit_code = 1


class UsageError(ToolError):
    """A bad flag, setting, or input file or folder: exit code 2."""
    exit_code = 2


class DataError(ToolError):
    """A data-pipeline step that cannot finish: exit code 1."""
    exit_code = 1


def report_error(exc) -> int:
    """Print the one line (an exception or a message) and return the exit code main() should
    give: the error class's, else 1."""
    print(f"error: {exc}", file=sys.stderr)
    return getattr(exc, "exit_code", 1)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports command-line misuse as one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def vocab_size_arg(text, allow_zero=True):
    """A tokenizer size for the data stages: 0 (Llama 2's, given by --tokenizer) or 1..65536,
    since token shards are uint16."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero) or value > 65536:
        low = 0 if allow_zero else 1
        raise argparse.ArgumentTypeError(f"expected {low}..65536 (uint16 shards), got {value}")
    return value


# a temperature this small already picks the likeliest token unless two logits lie within 1e-3 of
# each other, and far smaller ones overflow float32 when the logits are divided by them: greedy
GREEDY_BELOW = 1e-4


def greedy_if_tiny(temperature: float) -> float:
    """The temperature to sample at: 0 (greedy) below GREEDY_BELOW, else the one asked for."""
    return 0.0 if temperature < GREEDY_BELOW else temperature


# ---- dtypes and devices ------------------------------------------------------------------------

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bf16_supported() -> bool:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str, flag: str = "--device"):
    """A bad device name would otherwise surface as a traceback from deep inside model.to()."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag}={name}: not a device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag}={name}: this PyTorch sees no CUDA GPU; use {flag}=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag}={name}: MPS is not available here; use {flag}=cpu")


# ---- files -------------------------------------------------------------------------------------

def atomic_write(path: str, write_fn):
    """Call write_fn(tmp_path), then rename over path: readers never see a half-written file,
    and a failed write leaves no temporary file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_folder(path, write_fn):
    """write_fn(tmp_folder), then put it in place: a new folder is renamed into path whole; into
    a folder that is already there, only the files write_fn wrote are moved, each replacing its
    namesake, so that the folder's other files and subfolders stay as they are (check_output)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_fn(tmp)
        if os.path.isdir(path):
            for entry in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, entry), os.path.join(path, entry))
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- what may be replaced ----------------------------------------------------------------------
# The one rule for every output a user names (evaluate --report, export --out, train's out_dir): a
# file or folder the user did not ask us to replace is never replaced. An existing output is taken
# only when it is our own earlier output of the same kind (ours(path)), or an empty folder, or
# with --force; --force replaces only the files the step itself writes, and never an input of the
# same run. All of it is checked in one line before the work, not after it.

def check_writable(path, name, folder=False):
    """Refuse a place where the output cannot be written (a read-only folder, a file where a folder
    should be) now rather than after the work. A real probe file, not os.access: root passes every
    permission test, but not a read-only mount."""
    place = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise UsageError(f"{name}: {place} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as exc:
        raise UsageError(f"{name}: cannot write in {place} ({exc.strerror or exc})") from None


def check_output(path, name, force=False, ours=None, inputs=(), folder=False,
                 hint="pass --force to replace it"):
    """Refuse, in one line, an output path this step may not write (the rule above). name is how
    the user typed it (--report=x.json); inputs are this run's input files and folders."""
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise UsageError(f"{name}: is an input of this run ({source}); choose another path")
    if os.path.lexists(path):
        if folder and not os.path.isdir(path):
            raise UsageError(f"{name}: is a file; expected a folder")
        if not folder and os.path.isdir(path):
            raise UsageError(f"{name}: is a folder; expected a file name")
        empty_folder = folder and not os.listdir(path)
        if not (force or empty_folder or (ours is not None and ours(path))):
            raise UsageError(f"{name}: already exists; {hint}")
    check_writable(path, name, folder)


def is_json_with(path, keys) -> bool:
    """Whether path is a JSON object file holding one of keys: how a step recognises its own
    earlier report, which it may replace without --force."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and any(key in obj for key in keys)


# ---- how every script ends ---------------------------------------------------------------------

def run_main(main, argv=None) -> int:
    """main(argv) with the endings every script shares: Ctrl-C ends with one line and exit code
    130 (main keeps what it had finished before the interrupt reaches here), and a closed stdout
    (`| head`) ends quietly with the shell's code for a broken pipe, 141."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so that the interpreter's last flush is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def remove_stale_temp_files(folder, names):
    """Delete the temporary files atomic_write leaves when its process is killed mid-write
    (.NAME.PID.tmp for each of names). Call it only while holding the folder's lock_folder: then
    no live process can be writing them."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(f".{name}.") for name in names):
            os.remove(os.path.join(folder, entry))


def lock_folder(folder, holder="run"):
    """An exclusive lock on folder/.lock, held until the returned file is closed. A second process
    asking for it is refused in one line; the kernel drops the lock when its process ends, however
    it ends (flock), so a crashed or killed run leaves nothing stuck. Returns None where flock does
    not exist (Windows): no lock there."""
    try:
        import fcntl
    except ImportError:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise UsageError(f"{folder}: another {holder} is using it (pid {owner} holds {path}); "
                         f"wait for it to finish or choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_json(path: str, obj, indent=None):
    """JSON (UTF-8, non-ASCII kept as it is), written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")
    atomic_write(path, write)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- progress bars ---------------------------------------------------------------------------

def progress(*args, **kwargs):
    """A tqdm bar (same arguments) on a terminal. Into a log file (stderr redirected), where each
    redraw of a bar stays as a line, a plain line at every LOG_PROGRESS_STEP percent instead, or
    every LOG_PROGRESS_SECONDS when the total is unknown."""
    from tqdm import tqdm

    stream = kwargs.get("file") or sys.stderr
    is_terminal = getattr(stream, "isatty", lambda: False)()
    return tqdm(*args, **kwargs) if is_terminal else _log_progress_class()(*args, **kwargs)


LOG_PROGRESS_STEP = 10
LOG_PROGRESS_SECONDS = 30.0
_LOG_PROGRESS = []


def _log_progress_class():
    """tqdm subclassed on first use, so that importing cli does not import tqdm."""
    if _LOG_PROGRESS:
        return _LOG_PROGRESS[0]
    from tqdm import tqdm

    class LogProgress(tqdm):
        def __init__(self, *args, **kwargs):
            self._shown_step, self._shown_n = None, None
            kwargs.update(mininterval=0, miniters=1, maxinterval=float("inf"), dynamic_ncols=False)
            if kwargs.get("total") is None and not hasattr(args[0] if args else kwargs.get("iterable"), "__len__"):
                kwargs["mininterval"] = LOG_PROGRESS_SECONDS
            super().__init__(*args, **kwargs)

        def _step(self):
            if not self.total:
                return self.n, self._time()  # no total: every refresh (mininterval apart) is a line
            return min(100, int(100 * self.n / self.total)) // LOG_PROGRESS_STEP

        def display(self, msg=None, pos=None):
            step = self._step()
            if step != self._shown_step:
                self._shown_step, self._shown_n = step, self.n
                self.fp.write(self.__str__() + "\n")
                self.fp.flush()
            return True

        def clear(self, nolock=False):  # nothing drawn to clear: every line stays
            pass

        def close(self):
            if not self.disable:
                if self.n != self._shown_n:  # the last count, when the last line did not show it
                    self._shown_step = None
                    self.display()
            self.sp = None  # tqdm's close then writes no redraw of its own
            super().close()

    _LOG_PROGRESS.append(LogProgress)
    return LogProgress
