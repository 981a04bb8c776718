"""A training run's out_dir: which files are the run's, refusing a folder that holds another run,
--force replacing only those files, --auto_resume continuing the run there when its settings are
the same, the lock that keeps a second run out, and where last.pt, best.pt and ckpt.pt go. Only the
master process (global rank 0) writes here; under torchrun every node must see the folder."""
import os
import shutil
import uuid
from contextlib import contextmanager

from checkpoints import load_checkpoint
from cli import ToolError, UsageError, atomic_write, check_output, lock_folder, remove_stale_temp_files
from distributed import from_master, refuse_unless_all_agree, whereabouts

# what a run writes in out_dir (lock_out_dir removes their temporaries that a killed run left)
TRAINING_OUTPUTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt", "metrics.jsonl", "loss.png")
RUN_CHECKPOINTS = ("last.pt", "best.pt", "ckpt.pt", "adapter.pt")  # an out_dir holding one holds a run
# settings auto_resume does not compare: the switches that say what to do with out_dir, and the
# folder itself (a restart may reach the same shared folder by another path)
NOT_COMPARED = ("out_dir", "auto_resume", "force")
NODE_CHECK = ".node_check"  # what the master writes in out_dir for every process to read back


def last_checkpoint(out_dir) -> str:
    """last.pt: written at every evaluation, at the end and on Ctrl-C; what init_from=resume continues."""
    return os.path.join(out_dir, "last.pt")


def last_good(out_dir) -> str:
    """The checkpoint to name when a run has to stop."""
    last_path = last_checkpoint(out_dir)
    return last_path if os.path.exists(last_path) else "(none yet)"


def check_out_dir(cfg):
    """cli.check_output's rule for out_dir, before any work: a folder holding a run is continued
    (init_from=resume, or auto_resume where it holds a last.pt) or kept; only force starts a new run
    there, and replaces only the run's own files (TRAINING_OUTPUTS). A file, or a place that cannot
    be written, is refused."""
    out_dir = cfg["out_dir"]
    held = [name for name in RUN_CHECKPOINTS if os.path.isfile(os.path.join(out_dir, name))]
    resuming = cfg["init_from"] == "resume" or (cfg["auto_resume"] and "last.pt" in held)
    source = cfg["init_from"] if os.path.isfile(cfg["init_from"]) else None
    if cfg["force"] and source and any(os.path.samefile(source, os.path.join(out_dir, name)) for name in held):
        raise UsageError(f"init_from={source}: is one of the files --force would replace in out_dir={out_dir}; "
                         f"copy it elsewhere first, or train into another out_dir")
    check_output(out_dir, f"out_dir={out_dir}", cfg["force"], ours=lambda path: resuming or not held, folder=True,
                 hint=f"it holds a training run ({', '.join(held)}): continue it with --init_from=resume or "
                      f"--auto_resume, train into another out_dir, or pass --force to start over (replaces only "
                      f"the run's own files)")


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


def changed_settings(saved: dict, now: dict) -> list:
    """The settings (but NOT_COMPARED) in which the command `now` differs from the one that started
    or last continued the run, as "key=old (now new)"; init_from counts only where neither says
    resume (a run continued with --init_from=resume records that)."""
    ignored = set(NOT_COMPARED) | ({"init_from"} if "resume" in (saved.get("init_from"), now.get("init_from")) else set())
    return [f"{k}={saved.get(k, '(unset)')!r} (now {now.get(k, '(unset)')!r})"
            for k in sorted(set(saved) | set(now)) if k not in ignored and saved.get(k) != now.get(k)]


def resume_point(cfg, settings):
    """The run this job continues (its last.pt loaded), or None for a new run. auto_resume continues
    out_dir's run only where its settings were the same as `settings` (this command's)."""
    out_dir = cfg["out_dir"]
    if cfg["init_from"] == "resume":
        return load_resume_point(out_dir)
    if not cfg["auto_resume"] or not os.path.isfile(last_checkpoint(out_dir)):
        return None
    resume = load_checkpoint(last_checkpoint(out_dir))
    if "settings" not in resume.extra:
        raise UsageError(f"out_dir={out_dir}: its last.pt does not record the settings it was started with, so "
                         f"--auto_resume cannot tell whether it is this run; continue it with --init_from=resume")
    changed = changed_settings(resume.extra["settings"], settings)
    if changed:
        raise UsageError(f"out_dir={out_dir}: holds a run of other settings ({'; '.join(changed)}): rerun its "
                         f"command to continue it, pass --init_from=resume to continue it with these, or train "
                         f"into another out_dir")
    print(f"auto_resume: continuing the run in {out_dir} from iter {resume.extra['iter_num']}")
    return resume


def open_run_folder(cfg, settings, procs):
    """Claim out_dir for the job and find the run it continues: returns (the lock, or None outside
    the master process; last.pt loaded, or None for a new run). The master checks, locks and
    decides; under torchrun every process then reads back a token the master wrote there (a node
    that does not share the folder is refused) and loads the same last.pt. Any refusal, in any
    process, stops every process with the same line."""
    lock = resume = None
    decision = None
    if procs.master:
        try:
            lock = claim_out_dir(cfg)
            resume = resume_point(cfg, settings)
            decision = {"token": uuid.uuid4().hex, "iter": resume.extra["iter_num"] if resume else None}
            if procs.ddp:
                atomic_write(os.path.join(cfg["out_dir"], NODE_CHECK), lambda tmp: write_text(tmp, decision["token"]))
        except (ToolError, OSError) as exc:
            decision = exc
    decision = from_master(decision, procs)
    try:
        if isinstance(decision, BaseException):
            raise decision
        if procs.ddp:
            resume = check_same_run_folder(cfg, settings, procs, decision, resume)
    except BaseException:
        if lock:
            lock.close()
        raise
    finally:
        if procs.master and procs.ddp and os.path.exists(os.path.join(cfg["out_dir"], NODE_CHECK)):
            os.remove(os.path.join(cfg["out_dir"], NODE_CHECK))
    return lock, resume


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def check_same_run_folder(cfg, settings, procs, decision, resume):
    """Every process sees the master's out_dir and runs its command; returns the last.pt it loaded
    (the master's own where it is the master)."""
    masters = from_master(settings, procs)
    problem = None
    try:
        with open(os.path.join(cfg["out_dir"], NODE_CHECK)) as f:
            seen = f.read() == decision["token"]
    except OSError:
        seen = False
    # paths may differ between nodes (mount points): the files behind them are checked instead
    changed = [c for c in changed_settings(masters, settings) if not c.startswith(("data_dir=", "tokenizer=", "init_from="))]
    if not seen:
        problem = (f"out_dir={cfg['out_dir']}: {whereabouts(procs)} does not see the folder rank 0 writes; every "
                   f"node needs out_dir on a filesystem they all share (restarts resume from it)")
    elif changed:
        problem = f"{whereabouts(procs)} runs other settings than rank 0: {'; '.join(changed)}"
    elif decision["iter"] is not None and not procs.master:
        try:
            resume = load_checkpoint(last_checkpoint(cfg["out_dir"]))
            if resume.extra["iter_num"] != decision["iter"]:
                problem = (f"out_dir={cfg['out_dir']}: {whereabouts(procs)} reads a last.pt of iteration "
                           f"{resume.extra['iter_num']}, rank 0 one of {decision['iter']} (a stale copy?)")
        except ToolError as exc:
            problem = f"{whereabouts(procs)}: {exc}"
    refuse_unless_all_agree(problem, procs)
    return resume


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
