"""`tinystories.py download` against a real HTTP server on 127.0.0.1 that misbehaves on purpose:
dropped connections, 503s, ignored Range headers, wrong checksums and hostile archives."""
import hashlib
import io
import os
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import cli
import demo_corpus
import download
import tinystories

ARCHIVE_PATH = "/TinyStories_all_data.tar.gz"


def make_tar_gz(members):
    """members: list of (TarInfo, bytes or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_archive(tmp_path_factory):
    """(archive bytes, {shard name: shard bytes}) for a small demo corpus."""
    data_dir = tmp_path_factory.mktemp("demo_source")
    paths = demo_corpus.make_demo(str(data_dir), num_shards=2, stories_per_shard=40, seed=7)
    shards = {os.path.basename(p): open(p, "rb").read() for p in paths}
    # like the real archive: dataNN.json at the top level
    archive = make_tar_gz([(tarfile.TarInfo(name), data) for name, data in shards.items()])
    return archive, shards


class FlakyServer:
    """Serves one payload (or a {path: payload} dict, 404 for other paths); each behaviour applies
    to the first requests only, then it is well."""

    def __init__(self, payload, fail_first=0, fail_status=503, drop_first_after=None,
                 honour_range=True, status_override=None):
        self.payload = payload
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.drop_first_after = drop_first_after
        self.honour_range = honour_range
        self.status_override = status_override
        self.requests = []  # (Range header or None, status sent)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.base_url + ARCHIVE_PATH
        # a short poll interval keeps shutdown() quick at teardown
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def handle(self, handler):
        range_header = handler.headers.get("Range")
        n = len(self.requests)
        payload = self.payload.get(handler.path) if isinstance(self.payload, dict) else self.payload
        if payload is None:
            self.requests.append((range_header, 404))
            handler.send_error(404)
            return
        if self.status_override:
            self.requests.append((range_header, self.status_override))
            handler.send_error(self.status_override)
            return
        if n < self.fail_first:
            self.requests.append((range_header, self.fail_status))
            handler.send_error(self.fail_status)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and self.honour_range and int(match.group(1)) < len(payload):
            start = int(match.group(1))
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            handler.send_response(200)
        self.requests.append((range_header, 206 if start else 200))
        body = payload[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/gzip")
        handler.end_headers()
        if self.drop_first_after is not None and n == self.fail_first:
            # announce the whole body, send part of it, then hang up
            handler.wfile.write(body[:self.drop_first_after])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve():
    servers = []

    def start(payload, **behaviour):
        server = FlakyServer(payload, **behaviour)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def error_lines(err):
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0])  # the error is the last thing said
    return lines[0]


def test_clean_download_unpacks_the_corpus_and_skips_done_work(tmp_path, serve, demo_archive, capsys):
    archive, shards = demo_archive
    server = serve(archive)
    data_dir = tmp_path / "data"
    sha = hashlib.sha256(archive).hexdigest()
    assert tinystories.main(["download", f"--url={server.url}", f"--data_dir={data_dir}", f"--sha256={sha}"]) == 0
    assert (data_dir / "TinyStories_all_data.tar.gz").read_bytes() == archive
    assert not (data_dir / "TinyStories_all_data.tar.gz.part").exists()
    unpacked = data_dir / "TinyStories_all_data"
    assert sorted(os.listdir(unpacked)) == sorted(shards)
    for name, data in shards.items():
        assert (unpacked / name).read_bytes() == data
    assert "2 shards" in capsys.readouterr().out

    # everything is done: a second run must not even ask the server
    assert tinystories.main(["download", f"--url={server.url}", f"--data_dir={data_dir}"]) == 0
    assert len(server.requests) == 1
    out = capsys.readouterr().out
    assert "already downloaded" in out and "already exists" in out


def test_dropped_connection_resumes_with_range(tmp_path, serve, demo_archive):
    archive, _ = demo_archive
    cut = len(archive) // 3
    server = serve(archive, drop_first_after=cut)
    dest = tmp_path / "a.tar.gz"
    delays = []
    download.download_file(server.url, str(dest), backoff_s=0.01, sleep=delays.append)
    assert dest.read_bytes() == archive
    assert server.requests[0] == (None, 200)
    assert server.requests[1] == (f"bytes={cut}-", 206)  # asked only for the missing bytes
    assert len(server.requests) == 2 and delays == [0.01]


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, serve, demo_archive):
    archive, _ = demo_archive
    server = serve(archive)
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(archive[:100])
    download.download_file(server.url, str(dest), backoff_s=0)
    assert dest.read_bytes() == archive
    assert server.requests == [("bytes=100-", 206)]


def test_503_twice_then_success_backs_off_exponentially(tmp_path, serve, demo_archive):
    archive, _ = demo_archive
    server = serve(archive, fail_first=2, fail_status=503)
    dest = tmp_path / "a.tar.gz"
    delays = []
    download.download_file(server.url, str(dest), backoff_s=0.5, sleep=delays.append)
    assert dest.read_bytes() == archive
    assert [status for _, status in server.requests] == [503, 503, 200]
    assert delays == [0.5, 1.0]


def test_server_ignoring_range_starts_over_with_correct_bytes(tmp_path, serve, demo_archive):
    archive, _ = demo_archive
    cut = len(archive) // 2
    server = serve(archive, drop_first_after=cut, honour_range=False)
    dest = tmp_path / "a.tar.gz"
    download.download_file(server.url, str(dest), backoff_s=0, sleep=lambda s: None)
    assert dest.read_bytes() == archive  # not the first half followed by the whole file again
    assert server.requests == [(None, 200), (f"bytes={cut}-", 200)]


def test_persistent_failure_gives_up_with_one_line(tmp_path, serve, demo_archive, capsys):
    archive, _ = demo_archive
    server = serve(archive, fail_first=100, fail_status=503)
    data_dir = tmp_path / "data"
    rc = tinystories.main(["download", f"--url={server.url}", f"--data_dir={data_dir}",
                           "--retries=2", "--backoff=0"])
    assert rc == 1
    line = error_lines(capsys.readouterr().err)
    assert "503" in line and "run the same command again" in line
    assert len(server.requests) == 3  # the first try and two retries
    assert not (data_dir / "TinyStories_all_data.tar.gz").exists()


def test_http_404_fails_at_once(tmp_path, serve, demo_archive, capsys):
    archive, _ = demo_archive
    server = serve(archive, status_override=404)
    rc = tinystories.main(["download", f"--url={server.url}", f"--data_dir={tmp_path}", "--backoff=0"])
    assert rc == 1
    assert "HTTP 404" in error_lines(capsys.readouterr().err)
    assert len(server.requests) == 1


def test_wrong_sha256_leaves_no_file(tmp_path, serve, demo_archive, capsys):
    archive, _ = demo_archive
    server = serve(archive)
    data_dir = tmp_path / "data"
    rc = tinystories.main(["download", f"--url={server.url}", f"--data_dir={data_dir}", "--sha256=" + "0" * 64])
    assert rc == 1
    line = error_lines(capsys.readouterr().err)
    assert "sha256" in line and hashlib.sha256(archive).hexdigest() in line
    assert sorted(os.listdir(data_dir)) == []  # no archive, no .part, nothing unpacked


def test_url_from_environment(tmp_path, serve, demo_archive, monkeypatch):
    archive, shards = demo_archive
    server = serve(archive)
    monkeypatch.setenv(tinystories.URL_ENV_VAR, server.url)
    assert tinystories.main(["download", f"--data_dir={tmp_path}"]) == 0
    assert sorted(os.listdir(tmp_path / "TinyStories_all_data")) == sorted(shards)


def test_archive_member_escaping_with_dotdot_is_refused(tmp_path, serve, demo_archive, capsys):
    _, shards = demo_archive
    evil = make_tar_gz([(tarfile.TarInfo("data00.json"), shards["data00.json"]),
                        (tarfile.TarInfo("../evil.txt"), b"gotcha")])
    server = serve(evil)
    data_dir = tmp_path / "data"
    rc = tinystories.main(["download", f"--url={server.url}", f"--data_dir={data_dir}"])
    assert rc == 1
    assert "'../evil.txt'" in error_lines(capsys.readouterr().err)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["data", "data/TinyStories_all_data.tar.gz"]  # nothing unpacked anywhere


@pytest.mark.parametrize("kind, name, linkname", [
    ("file", "/tmp/absolute.txt", None),
    ("file", "sub/../../escape.txt", None),
    ("symlink", "link", "../../outside"),
    ("symlink", "abs_link", "/etc/passwd"),
    ("hardlink", "hard", "../outside"),
    ("fifo", "pipe", None),
])
def test_unsafe_members_are_refused_by_name(tmp_path, kind, name, linkname):
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                 "fifo": tarfile.FIFOTYPE}[kind]
    if linkname:
        info.linkname = linkname
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar_gz([(tarfile.TarInfo("ok.json"), b"[]"),
                                     (info, b"x" if kind == "file" else None)]))
    target = tmp_path / "out" / "TinyStories_all_data"
    with pytest.raises(cli.DataError, match=re.escape(repr(name))):
        download.unpack_archive(str(archive), str(target))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_symlink_inside_the_target_is_allowed(tmp_path):
    link = tarfile.TarInfo("alias.json")
    link.type, link.linkname = tarfile.SYMTYPE, "data00.json"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar_gz([(tarfile.TarInfo("data00.json"), b"[]"), (link, None)]))
    target = tmp_path / "TinyStories_all_data"
    download.unpack_archive(str(archive), str(target))
    assert (target / "alias.json").read_bytes() == b"[]"


# ---- download_model -----------------------------------------------------------------------------

TEST_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def stories260K_files():
    return {f"/stories260K/{name}": open(os.path.join(TEST_DATA, name), "rb").read()
            for name in ("stories260K.pt", "tok512.model")}


def test_download_model_fetches_a_published_model_resumably_and_checks_it(tmp_path, serve, capsys):
    """download_model stories260K from a mirror that drops the first connection: resumed with
    Range, both files land checked, the model loads with its tokenizer, a second run asks nothing."""
    files = stories260K_files()
    server = serve(files, drop_first_after=100_000)
    data_dir = tmp_path / "models"
    assert tinystories.main(["download_model", "stories260K", f"--base_url={server.base_url}",
                             f"--data_dir={data_dir}", "--backoff=0.01"]) == 0
    for path, payload in files.items():
        assert (data_dir / os.path.basename(path)).read_bytes() == payload
    assert server.requests[1][0] == "bytes=100000-"  # resumed where the connection dropped
    assert sorted(os.listdir(data_dir)) == ["stories260K.pt", "tok512.model"]
    from checkpoints import find_tokenizer, load_checkpoint
    assert find_tokenizer(load_checkpoint(str(data_dir / "stories260K.pt"))) == str(data_dir / "tok512.model")
    n = len(server.requests)
    assert tinystories.main(["download_model", "stories260K", f"--base_url={server.base_url}",
                             f"--data_dir={data_dir}"]) == 0
    assert len(server.requests) == n and "already downloaded" in capsys.readouterr().out


def test_download_model_refuses_a_wrong_file_and_keeps_nothing(tmp_path, serve, capsys):
    files = stories260K_files()
    files["/stories260K/stories260K.pt"] = open(os.path.join(TEST_DATA, "seed_format_lora260K.pt"), "rb").read()[:5000]
    server = serve(files)
    data_dir = tmp_path / "models"
    assert tinystories.main(["download_model", "stories260K", f"--base_url={server.base_url}",
                             f"--data_dir={data_dir}"]) == 1
    assert "stories260K" in error_lines(capsys.readouterr().err)
    assert os.listdir(data_dir) == []


def test_published_model_urls():
    """Without a mirror: tinyllamas on Hugging Face, the Llama 2 tokenizer from llama2.c."""
    assert tinystories.model_file_url("stories15M.pt") == \
        "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories15M.pt"
    assert tinystories.model_file_url(tinystories.LLAMA2_TOKENIZER_URL, "http://127.0.0.1:1/m") == \
        "http://127.0.0.1:1/m/tokenizer.model"
    for name, (files, shape) in tinystories.PUBLISHED_MODELS.items():
        assert files[0][1] == f"{name}.pt" and shape["vocab_size"] in (512, 32000)


def test_a_host_that_does_not_resolve_fails_at_once(tmp_path, monkeypatch, capsys):
    """Offline, name resolution fails; retrying with backoff (63 s over six tries) cannot help."""
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    sleeps = []
    with pytest.raises(cli.DataError, match="cannot resolve huggingface.example") as refused:
        download.download_file("https://huggingface.example/model.pt", str(tmp_path / "model.pt"),
                               sleep=sleeps.append, url_hint="--base_url")
    assert sleeps == [] and "--base_url" in str(refused.value) and "\n" not in str(refused.value)
    assert not list(tmp_path.iterdir())
    # through the command line: one line, exit code 1, nothing left behind
    rc = tinystories.main(["download_model", "stories260K", f"--data_dir={tmp_path / 'data'}",
                           "--base_url=https://huggingface.example/models"])
    assert rc == 1 and "cannot resolve huggingface.example" in error_lines(capsys.readouterr().err)
