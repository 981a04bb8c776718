"""Downloads that survive a flaky network: resumed with HTTP Range, retried with backoff, verified
before they are renamed into place; and a tar unpack that refuses members landing outside its folder."""
import os
import re
import shutil
import sys
import tarfile
import time

from tqdm import tqdm

from cli import DataError, file_sha256, progress

TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _TransientFailure(Exception):
    pass


def _parse_content_range(header):
    """'bytes 100-199/200' -> (100, 200); 'bytes */200' -> (None, 200); total None if '*'."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _short_reason(exc):
    """The part of a requests/urllib3 error worth one line: 'Connection refused', not the pool repr."""
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\] [^'\")]+", r"IncompleteRead\([^)]*\)", r"[Rr]ead timed out",
                    r"Connection reset by peer", r"Connection aborted"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _unresolved_host(exc):
    """The host name a connection failed to resolve, or None for any other failure. A name that
    does not resolve means no network or a mistyped host: retrying will not fix it."""
    import urllib3

    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    resolution_error = getattr(urllib3.exceptions, "NameResolutionError", ())
    if isinstance(reason, resolution_error) or re.search(r"Failed to resolve|Name or service not known|"
                                                          r"name resolution|nodename nor servname", str(exc)):
        host = re.search(r"host='([^']+)'", str(exc))
        return host.group(1) if host else "the server"
    return None


def _iter_body(response, chunk_size=1 << 20):
    raw = response.raw
    if hasattr(raw, "read1"):
        # urllib3 >= 2: read1 hands over every byte that arrived, so a dropped connection loses
        # nothing (a larger read would discard its partial buffer) and the resume starts there
        while chunk := raw.read1(chunk_size, decode_content=False):
            yield chunk
    else:
        yield from response.iter_content(chunk_size=64 << 10)


def download_file(url, dest, sha256=None, retries=6, backoff_s=1.0, timeout_s=60.0, sleep=time.sleep, check=None,
                  url_hint="--url"):
    """Download url to dest via dest.part: resumes with HTTP Range, retries transient failures
    with exponential backoff, checks the size, the sha256 and check(part) if given (which raises
    DataError for a file that is not what was asked for), renames only a verified file. url_hint: where
    the user sets the address, named in the error for a URL the server does not have."""
    import requests
    import urllib3

    part = f"{dest}.part"
    failures = 0
    while True:
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        # identity: a server that gzips on the fly would change the bytes and their count
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
                status = response.status_code
                if status == 416 and offset:
                    _, total = _parse_content_range(response.headers.get("Content-Range"))
                    if total == offset:
                        break  # the partial file is already whole
                    os.remove(part)
                    raise _TransientFailure(f"server cannot resume at byte {offset}, starting over")
                if status in TRANSIENT_HTTP_STATUS:
                    raise _TransientFailure(f"HTTP {status} {response.reason}")
                if status not in (200, 206):
                    raise DataError(f"download of {url} failed: HTTP {status} {response.reason} "
                                    f"(check {url_hint})")
                if status == 206:
                    start, total = _parse_content_range(response.headers.get("Content-Range"))
                    if start != offset:
                        os.remove(part)
                        raise _TransientFailure(f"server resumed at byte {start}, not {offset}; starting over")
                    mode = "ab"
                else:  # 200: the server sends the whole file, whether or not we asked for a range
                    offset, mode = 0, "wb"
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                with open(part, mode) as f, progress(total=total, initial=offset, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=os.path.basename(dest)) as bar:
                    for chunk in _iter_body(response):
                        f.write(chunk)
                        bar.update(len(chunk))
            size = os.path.getsize(part)
            if total is not None and size < total:
                raise _TransientFailure(f"connection closed after {size} of {total} bytes")
            if total is not None and size > total:
                os.remove(part)
                raise DataError(f"download of {url} gave {size} bytes, more than the announced {total}; "
                                f"the partial file was deleted, run the command again")
            break
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL) as exc:
            raise DataError(f"download: bad URL {url!r} ({exc}); pass --url=http(s)://...") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError, _TransientFailure) as exc:
            host = _unresolved_host(exc) if isinstance(exc, requests.exceptions.ConnectionError) else None
            if host:
                raise DataError(f"download of {url}: cannot resolve {host} (no network, or a mistyped host); "
                                f"connect, or pass {url_hint or '--url'} with a reachable mirror") from None
            grew = os.path.exists(part) and os.path.getsize(part) > offset
            failures = 1 if grew else failures + 1  # a failure after progress starts the count again
            reason = _short_reason(exc)
            if failures > retries:
                raise DataError(f"download of {url} failed {failures} times in a row (last: {reason}); "
                                f"run the same command again to resume, or use --url with a mirror") from None
            delay = min(backoff_s * 2 ** (failures - 1), 60.0)
            tqdm.write(f"download: {reason}; retry {failures}/{retries} in {delay:.1f}s", file=sys.stderr)
            sleep(delay)

    if sha256:
        actual = file_sha256(part)
        if actual != sha256.lower():
            os.remove(part)
            raise DataError(f"download of {url}: sha256 {actual} does not match --sha256={sha256}; "
                            f"the file was deleted, check the checksum or the mirror and run again")
    if check:
        try:
            check(part)
        except DataError:
            os.remove(part)
            raise
    os.replace(part, dest)
    return dest


def unsafe_member_reason(member, root):
    """Why extracting this tar member could write outside root (None when it is safe)."""
    name = member.name
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    root = os.path.realpath(root)
    dest = os.path.realpath(os.path.join(root, name))
    if dest != root and not dest.startswith(root + os.sep):
        return "path leads outside the target folder"
    if member.issym() or member.islnk():
        if os.path.isabs(member.linkname):
            return f"link to absolute path {member.linkname!r}"
        base = os.path.dirname(dest) if member.issym() else root
        target = os.path.realpath(os.path.join(base, member.linkname))
        if target != root and not target.startswith(root + os.sep):
            return f"link to {member.linkname!r} points outside the target folder"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "device, fifo or other special file"
    return None


def unpack_archive(archive, target):
    """Unpack into target via target.partial, refusing (before writing them) any member that
    would land outside; the finished folder is renamed into place only when all went well."""
    partial = f"{target}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # streaming: one pass over the gzip stream
                reason = unsafe_member_reason(member, partial)
                if reason:
                    raise DataError(f"archive {archive}: refusing member {member.name!r} ({reason}); "
                                    f"the archive is corrupt or malicious, delete it and download again")
                if hasattr(tarfile, "data_filter"):
                    tar.extract(member, partial, set_attrs=False, filter="data")
                else:
                    tar.extract(member, partial, set_attrs=False)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"archive {archive} cannot be unpacked ({exc}); delete it and download again") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target)
