"""A training run's out_dir: which files are the run's, refusing a folder that holds another run,
--force replacing only those files, the lock that keeps a second run out, and where last.pt,
best.pt and ckpt.pt go. Only the master process (rank 0) writes here."""
import os
import shutil
from contextlib import contextmanager

from checkpoints import load_checkpoint
from cli import UsageError, atomic_write, check_output, lock_folder, remove_stale_temp_files

# what a run writes in out_dir (lock_out_dir removes their temporaries that a killed run left)
TRAINING_OUTPUTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt", "metrics.jsonl", "loss.png")
RUN_CHECKPOINTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt")  # an out_dir holding one holds a run


def last_checkpoint(out_dir) -> str:
    """last.pt: written at every evaluation, at the end and on Ctrl-C; what init_from=resume continues."""
    return os.path.join(out_dir, "last.pt")


def last_good(out_dir) -> str:
    """The checkpoint to name when a run has to stop."""
    last_path = last_checkpoint(out_dir)
    return last_path if os.path.exists(last_path) else "(none yet)"


def check_out_dir(cfg):
    """cli.check_output's rule for out_dir, before any work: a folder holding a run is continued
    (init_from=resume) or kept; only force starts a new run there, and replaces only the run's
    own files (TRAINING_OUTPUTS). A file, or a place that cannot be written, is refused."""
    out_dir, resuming = cfg["out_dir"], cfg["init_from"] == "resume"
    held = [name for name in RUN_CHECKPOINTS if os.path.isfile(os.path.join(out_dir, name))]
    source = cfg["init_from"] if os.path.isfile(cfg["init_from"]) else None
    if cfg["force"] and source and any(os.path.samefile(source, os.path.join(out_dir, name)) for name in held):
        raise UsageError(f"init_from={source}: is one of the files --force would replace in out_dir={out_dir}; "
                         f"copy it elsewhere first, or train into another out_dir")
    check_output(out_dir, f"out_dir={out_dir}", cfg["force"], ours=lambda path: resuming or not held, folder=True,
                 hint=f"it holds a training run ({', '.join(held)}): continue it with --init_from=resume, train "
                      f"into another out_dir, or pass --force to start over (replaces only the run's own files)")


def claim_out_dir(cfg):
    """check_out_dir, then lock_out_dir: the returned lock is the run's until it closes it."""
    check_out_dir(cfg)
    return lock_out_dir(cfg["out_dir"])


def lock_out_dir(out_dir):
    """Hold out_dir/.lock for the run's life (cli.lock_folder: a second run on the same out_dir is
    refused in one line, a crashed run never leaves it stuck); then, under the lock, remove the
    temporary files a killed run left behind."""
    lock = lock_folder(out_dir, "training run")
    remove_stale_temp_files(out_dir, TRAINING_OUTPUTS)
    return lock


def remove_previous_run(out_dir):
    """force: the run being replaced leaves none of its files to be mistaken for the new run's."""
    for name in TRAINING_OUTPUTS:
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def load_resume_point(out_dir):
    last_path = last_checkpoint(out_dir)
    if not os.path.isfile(last_path):
        raise UsageError(f"init_from=resume: {last_path} does not exist (train first, or fix out_dir)")
    return load_checkpoint(last_path)


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # filesystems without hard links
        shutil.copyfile(src, dst)


def save_best(out_dir) -> str:
    """best.pt and ckpt.pt: two more names for last.pt's file (copies where links fail); returns
    best.pt's path."""
    for name in ("best.pt", "ckpt.pt"):
        atomic_write(os.path.join(out_dir, name), lambda tmp: link_or_copy(last_checkpoint(out_dir), tmp))
    return os.path.join(out_dir, "best.pt")


@contextmanager
def removed_if_left_empty(out_dir, creator: bool):
    """An out_dir this run creates (creator: the process that would) is removed again if the run
    fails before writing to it; an out_dir that was there stays as it was."""
    new_out_dir = None if os.path.lexists(out_dir) or not creator else out_dir
    try:
        yield
    except BaseException:
        if new_out_dir and os.path.isdir(new_out_dir) and os.listdir(new_out_dir) == [".lock"]:
            os.remove(os.path.join(new_out_dir, ".lock"))
            os.rmdir(new_out_dir)
        raise
