"""The cache of compiled decode steps (package_cache.py, decode_package.py): broken entries are
built again, kills leave nothing behind, two processes build a key once, the folder keeps to its
bound. The cache is tested with a builder that writes a small zip in place of a compiled step
(a real AOTInductor build takes a minute on 2 cores; test_fast_sampling.py runs real ones)."""
import os
import subprocess
import sys
import time
import zipfile

import pytest

import decode_package
from helpers import ROOT, tiny_model
from package_cache import FORMAT_ENTRY, PackageCache

# a process that gets key "k" from the cache in folder argv[1], its builder slow enough for a race;
# prints what it loaded and whether it built
RACER = """
import sys, time, zipfile
from package_cache import PackageCache
def builder(tmp):
    print("built", flush=True)
    time.sleep(1.0)
    with zipfile.ZipFile(tmp, "w") as archive:
        archive.writestr("payload", "made by a racer")
    return True
def opener(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read("payload").decode()
print(PackageCache(sys.argv[1]).get("k", builder, opener))
"""


def write_payload(text):
    def builder(tmp):
        builder.calls += 1
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr("payload", text * 1000)
        return True
    builder.calls = 0
    return builder


def read_payload(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read("payload").decode()[:5]


def test_an_entry_is_built_once_then_loaded(tmp_path):
    cache = PackageCache(str(tmp_path))
    builder = write_payload("first")
    assert cache.get("k", builder, read_payload) == "first"
    assert cache.get("k", builder, read_payload) == "first" and builder.calls == 1
    assert sorted(os.listdir(tmp_path)) == [".build.lock", "k.pt2"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt", "foreign"])
def test_a_broken_entry_is_built_again_with_a_one_line_note(tmp_path, capsys, damage):
    cache = PackageCache(str(tmp_path))
    cache.get("k", write_payload("first"), read_payload)
    path = tmp_path / "k.pt2"
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "corrupt":  # one byte of the stored payload flipped: the zip still opens
        at = data.index(b"first" * 10) + 20
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
        assert zipfile.ZipFile(path).namelist()
    else:  # a complete package of another cache format (an older version of this code)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("payload", "old")
            archive.writestr(FORMAT_ENTRY, '{"format": 1, "key": "k"}')
    capsys.readouterr()
    builder = write_payload("again")
    assert cache.get("k", builder, read_payload) == "again" and builder.calls == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: the cached package") and "building it again" in err[0], err
    assert cache.get("k", builder, read_payload) == "again" and builder.calls == 1


def test_a_killed_build_leaves_nothing_after_the_next_build(tmp_path):
    """A build killed mid-way leaves its temporary; the next build removes it (its process is
    gone), and leaves a running process's temporary alone."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    killed.kill()
    killed.wait()
    (tmp_path / f".{killed.pid}.k.pt2").write_bytes(b"x" * 1000)
    (tmp_path / f".{killed.pid}.k").mkdir()  # the packager's own folder
    (tmp_path / f".{os.getppid()}.other.pt2").write_bytes(b"x")  # a live process: not ours to remove
    cache = PackageCache(str(tmp_path))
    assert cache.get("k", write_payload("fresh"), read_payload) == "fresh"
    assert sorted(os.listdir(tmp_path)) == [f".{os.getppid()}.other.pt2", ".build.lock", "k.pt2"]


def test_two_processes_racing_on_one_key_build_it_once(tmp_path):
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count("built") == 1 and stdout.count("made by a racer") == 2, outputs


def test_the_cache_keeps_to_its_bound_least_recently_used_first(tmp_path):
    cache = PackageCache(str(tmp_path))
    for i, key in enumerate("abc"):
        cache.get(key, write_payload(key * 5), read_payload)
        os.utime(tmp_path / f"{key}.pt2", (time.time() - 100 + i, time.time() - 100 + i))
    cache.get("a", write_payload("x"), read_payload)  # a use: "a" is now the most recent
    size = (tmp_path / "a.pt2").stat().st_size
    bounded = PackageCache(str(tmp_path), max_bytes=int(2.5 * size))
    bounded.get("d", write_payload("ddddd"), read_payload)
    assert sorted(p.name for p in tmp_path.glob("*.pt2")) == ["a.pt2", "d.pt2"]  # b, then c went
    # an entry larger than the bound alone is still kept: it was asked for
    PackageCache(str(tmp_path), max_bytes=1).get("e", write_payload("eeeee"), read_payload)
    assert [p.name for p in tmp_path.glob("*.pt2")] == ["e.pt2"]


def test_a_builder_that_fails_is_not_run_again_for_that_key(tmp_path):
    cache = PackageCache(str(tmp_path))
    calls = []
    assert cache.get("k", lambda tmp: calls.append(tmp) or False, read_payload) is None
    assert cache.get("k", lambda tmp: calls.append(tmp) or False, read_payload) is None
    assert len(calls) == 1 and not list(tmp_path.glob("*.pt2"))


def test_the_package_key_changes_with_every_model_setting():
    """The same weights read with another context length or RoPE base compile another graph;
    the weights alone do not say so."""
    model = tiny_model()
    key = decode_package.package_key(model, 1, 0.0, None, 1.0)
    assert decode_package.package_key(model, 1, 0.0, None, 1.0) == key
    for setting, value in [("max_seq_len", 64), ("norm_eps", 1e-6)]:
        other = tiny_model(**{setting: value})
        assert all(a.equal(b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
        assert decode_package.package_key(other, 1, 0.0, None, 1.0) != key, setting
    assert decode_package.package_key(model, 2, 0.0, None, 1.0) != key
    assert decode_package.package_key(model, 1, 0.8, 10, 1.0) != key
