"""TinyStories data: download the archive (or make an offline demo corpus in the same format),
train a sentencepiece tokenizer on it and pretokenize it for pretraining.

    python tinystories.py download    [--data_dir=data] [--url=URL] [--sha256=HEX] [--retries=6]
    python tinystories.py make_demo   [--data_dir=data] [--num_shards=4] [--stories_per_shard=5000] [--seed=1337]
    python tinystories.py train_vocab --vocab_size=N [--data_dir=data] [--num_shards=10]
    python tinystories.py pretokenize --vocab_size=N [--data_dir=data] [--workers=CPUS] [--tokenizer=PATH]

Layout under --data_dir (see docs formats.md sections 5 and 6):
    TinyStories_all_data.tar.gz       the downloaded archive (TINYSTORIES_URL overrides its address)
    TinyStories_all_data/dataNN.json  JSON lists of {"story", "instruction", "summary", "source"}
    tok{N}.model, tok{N}.bin          sentencepiece BPE tokenizer and its llama2.c export
    tok{N}/dataNN.bin                 uint16 tokens: per story BOS + encode(story.strip()), no EOS
--vocab_size=0 means the Llama 2 tokenizer given by --tokenizer=PATH (output in tok0/).
Shard 00 is the validation split, the others are training data.
"""
import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

ARCHIVE_NAME = "TinyStories_all_data.tar.gz"
SHARDS_DIRNAME = "TinyStories_all_data"
DEFAULT_URL = f"https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{ARCHIVE_NAME}"
URL_ENV_VAR = "TINYSTORIES_URL"


class DataError(Exception):
    """A runtime failure whose message is the one line the user sees (exit code 1)."""


class ShardError(DataError):
    """A failure inside a worker, already prefixed with the shard it happened on."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports CLI misuse as one line (no usage dump) and exits with code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# shards: listing and streaming records with bounded memory

def shards_dir(data_dir):
    return os.path.join(data_dir, SHARDS_DIRNAME)


def list_shards(data_dir):
    shards = sorted(glob.glob(os.path.join(shards_dir(data_dir), "data*.json")))
    if not shards:
        raise DataError(f"no dataNN.json shards in {shards_dir(data_dir)}: run "
                        f"`python tinystories.py download --data_dir={data_dir}` (or make_demo) first")
    return shards


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def iter_json_records(path, chunk_chars=1 << 20):
    """Yield the items of a file holding one JSON list, one at a time. The file is read in
    chunks, so memory is bounded by the chunk and the largest record, not by the shard."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False
        state = "start"  # start -> first_item -> (item -> separator)* -> done
        while True:
            pos = _WHITESPACE.match(buf, pos).end()
            if pos == len(buf):
                if eof:
                    raise ValueError(f"{path}: JSON list ends early (truncated file?)")
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            char = buf[pos]
            if state == "start":
                if char != "[":
                    raise ValueError(f"{path}: not a JSON list (expected '[' at the start)")
                pos, state = pos + 1, "first_item"
            elif state == "separator":
                if char == "]":
                    _expect_only_whitespace(path, buf[pos + 1:], f, chunk_chars)
                    return
                if char != ",":
                    raise ValueError(f"{path}: invalid JSON list (expected ',' or ']', found {char!r})")
                pos, state = pos + 1, "item"
            elif char == "]" and state == "first_item":
                _expect_only_whitespace(path, buf[pos + 1:], f, chunk_chars)
                return
            else:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # a value is whole once the list's next separator is in sight: "3" may be
                    # the start of "3.25" split across two chunks
                    complete = eof or (end < len(buf) and buf[end] in " \t\n\r,]")
                except json.JSONDecodeError as exc:
                    if eof:
                        raise ValueError(f"{path}: invalid JSON ({exc.msg})") from None
                    complete = False
                if not complete:
                    more = f.read(chunk_chars)
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
                    continue
                yield value
                pos, state = end, "separator"


def _expect_only_whitespace(path, rest, f, chunk_chars):
    while True:
        if rest.strip(" \t\n\r"):
            raise ValueError(f"{path}: invalid JSON (extra data after the list)")
        rest = f.read(chunk_chars)
        if not rest:
            return


def write_json_atomic(path, obj, indent=None):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
    os.replace(tmp, path)


def run_shard_jobs(worker, jobs, workers, desc):
    """Run worker(*job) for every job in a process pool, with a progress bar over shards. The
    first failure cancels what has not started and is raised (a ShardError naming its shard)."""
    results = []
    # spawn, not fork: callers may hold threads (tests, servers), which fork does not copy safely
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context) as pool:
        futures = [pool.submit(worker, *job) for job in jobs]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="shard"):
                results.append(future.result())
        except BrokenProcessPool:
            raise DataError(f"{desc}: a worker process died (out of memory?); try fewer --workers") from None
        finally:
            for future in futures:
                future.cancel()
    return results


def worker_peak_rss_mb():
    """Peak resident memory of this process in MB. Linux's ru_maxrss survives exec, so a spawned
    worker would report its parent's peak; VmHWM belongs to this process image alone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# -----------------------------------------------------------------------------
# download: resumable, retried, verified; then a safe unpack

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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short_reason(exc):
    """The part of a requests/urllib3 error worth one line: 'Connection refused', not the pool repr."""
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\] [^'\")]+", r"IncompleteRead\([^)]*\)", r"[Rr]ead timed out",
                    r"Connection reset by peer", r"Connection aborted"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _iter_body(response, chunk_size=1 << 20):
    raw = response.raw
    if hasattr(raw, "read1"):
        # urllib3 >= 2: read1 hands over every byte that arrived, so a dropped connection loses
        # nothing (a larger read would discard its partial buffer) and the resume starts there
        while chunk := raw.read1(chunk_size, decode_content=False):
            yield chunk
    else:
        yield from response.iter_content(chunk_size=64 << 10)


def download_file(url, dest, sha256=None, retries=6, backoff_s=1.0, timeout_s=60.0, sleep=time.sleep):
    """Download url to dest via dest.part: resumes with HTTP Range, retries transient failures
    with exponential backoff, checks the size and the sha256, renames only a verified file."""
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
                                    f"(check --url or ${URL_ENV_VAR})")
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
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
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


def cmd_download(args):
    url = args.url or os.environ.get(URL_ENV_VAR) or DEFAULT_URL
    os.makedirs(args.data_dir, exist_ok=True)
    archive = os.path.join(args.data_dir, ARCHIVE_NAME)
    target = shards_dir(args.data_dir)
    if os.path.exists(archive) and args.sha256 and file_sha256(archive) != args.sha256.lower():
        print(f"{archive} does not match --sha256, downloading it again", file=sys.stderr)
        os.remove(archive)
    if os.path.exists(archive):
        print(f"{archive} already downloaded, skipping the download")
    else:
        download_file(url, archive, sha256=args.sha256, retries=args.retries, backoff_s=args.backoff)
    if os.path.isdir(target):
        print(f"{target} already exists, skipping the unpack (delete it to unpack again)")
    else:
        unpack_archive(archive, target)
    n_shards = len(glob.glob(os.path.join(target, "data*.json")))
    print(f"download: {archive} ({os.path.getsize(archive) / 1e6:.1f} MB) -> {n_shards} shards in {target}")


# -----------------------------------------------------------------------------
# make_demo: an offline, procedurally generated corpus in the archive's format
#
# The three instruction words appear in a story only because the instruction asked for them:
# the fixed text of the templates uses none of the list words (tests check this), so a model
# that writes the requested words has learned to follow the instruction, not the templates.

DEMO_VERBS = sorted(set("""
add agree answer bake bark bathe beg blink bloom boil borrow bounce bow brush bubble
bump buzz camp carry chase chat check cheer chew chop clap clean climb clip close collect
color comb cook copy count crack crash crawl cross crunch cuddle dance dash decorate deliver
discover doodle drag dream dress drip drop drum dry dust enjoy explore fan fetch fill fish
fix fizz flap flash flip float fold follow fry gather giggle glow grab greet growl gulp
guess hammer hatch hook hop hope hug hum hunt hurry invite jingle jog join juggle jump kick
kiss knit knock lick lift load lock mark march melt mend mix mop munch nap nibble nod nudge
obey open order pack paddle paint park pass pat peek peel pet pick pinch plan plant plop
point poke polish pop pounce pour practice prance press pretend print pull pump purr push
quack race rake rattle reach relax remember reply rescue rest return roar rock roll row rub
rush rustle sail save scatter scoop scream scrub search sew shiver shout sigh sip skate skid
skip sled slip slurp smell snack snap sneeze sniff snore snuggle soar sort sparkle spell
spill splash spray sprinkle squeak squeeze squint squish stack stamp stare start step
stir stomp stop stretch stroll stuff surf swap swirl tag tap taste tickle tidy tip toss touch
tow trace trim trip trot tuck tug tumble twirl unlock unpack visit wag walk wander
wash watch water wave whirl whisper whistle wiggle wink wipe wish wobble wonder wrap yawn yell
yelp zip zoom
""".split()))

DEMO_NOUNS = sorted(set("""
acorn airplane anchor ant apple apron arrow axe backpack badge bag ball balloon banana bandage
basket bat beach bead bean bee bell belt bench berry bike bird blanket block boat bone
book boot bottle bowl box bracelet branch bridge broom brush bucket bug bus butterfly button
cake camel camera candle cap car card carrot castle cat cave chair cherry chicken clock cloud
clown coat coin comb cookie cow crab crayon crown cup cupcake deer desk dinosaur doll dolphin
donkey door dragon drum duck eagle egg elephant fairy feather fence flag flower flute fork fox
frog gate ghost giraffe glove goat goose grape guitar hammer hat helmet hen hill horse
jacket jar jeep kangaroo kettle key kite koala ladder lamp leaf lemon letter lion lizard lock
log lollipop map marble medal melon mirror mitten monkey moon mop mouse muffin mushroom nest
net notebook nut octopus orange owl paddle pail pan pancake parrot peach pear pebble pen pencil
penguin piano pie pig pillow pizza plane plate plum pony pot potato puddle pumpkin puppet
puzzle rabbit radio rainbow ribbon ring robot rock rocket rope rose ruler sandwich scarf seal
seed shark sheep shell ship shoe shovel sled slide snail snake snowman sock sofa spider spoon
squirrel star sticker stone stool strawberry sweater swing table teapot teddy tent tiger tomato
towel tower toy tractor train truck trumpet turtle umbrella vase violin wagon wallet wand
watch whale wheel whistle window wolf worm zebra
""".split()))

DEMO_ADJECTIVES = sorted(set("""
adorable angry awesome bald beautiful bouncy bright brilliant broken brown bumpy busy calm
careful cheerful chewy clean clever cloudy clumsy colorful comfy cool cozy crispy crunchy cuddly
curious curly cute damp dark dirty dizzy dusty eager early elegant empty enormous excited
fancy fantastic fast fierce fine fluffy foggy fragile free fresh friendly frozen funny furry
fuzzy gentle giant gigantic gloomy glossy golden gorgeous grassy gray green greedy grumpy
hairy handsome heavy helpful hollow hot huge hungry icy itchy jolly juicy lazy leafy light
lively lonely loose loud lovely lucky magic messy mighty moldy muddy narrow naughty neat
new noisy orange pale patient peaceful pink plain playful plump polite poor precious
pretty proud puffy purple quick quiet rainy rare red rich ripe rocky rough round royal rusty
salty sandy scary shaggy sharp shiny short shy silly silver slimy slippery slow small smelly
smooth snowy soft soggy sour sparkly special spicy spiky spooky spotty squeaky squishy steep
sticky stinky stormy strange striped strong sturdy sunny super sweet swift tall tame tasty thick
thin thirsty tidy tiny tough twinkly ugly warm wavy weak wet white wide wild windy wise
wobbly wooden woolly yellow young yummy zany
brave chubby chilly creamy dreamy frosty gooey lumpy merry misty rosy shaky sleepy sneaky
starry toasty tricky wrinkly bossy jumpy
""".split()))

# GPT-4 prompt phrases for each feature, as the archive's prompts word them
GPT_FEATURE_PHRASES = {
    "Dialogue": "the story should contain at least one dialogue",
    "BadEnding": "the story has a bad ending",
    "Conflict": "the story has some sort of conflict",
    "Foreshadowing": "the narrative uses foreshadowing or setup and payoff",
    "Twist": "something unexpected happens / there is at least one plot twist",
    "MoralValue": "the story has a moral value",
}

# A feature's sentences are recognisable by these patterns, which no other template uses.
DEMO_FEATURE_MARKERS = {
    "Dialogue": r'"',
    "BadEnding": r"\bsad(ly)?\b",
    "Conflict": r"\bproblem\b|\bfight\b",
    "Foreshadowing": r"\bknow\b",
    "Twist": r"\bsurprise\b",
    "MoralValue": r"\blearned\b|\blesson\b",
}

DEMO_HEROES = [  # (name, kind, pronoun)
    ("Lily", "girl", "she"), ("Mia", "girl", "she"), ("Sue", "girl", "she"), ("Amy", "girl", "she"),
    ("Anna", "girl", "she"), ("Emma", "girl", "she"), ("Lucy", "girl", "she"), ("Sara", "girl", "she"),
    ("Zoe", "girl", "she"), ("Kim", "girl", "she"), ("Ella", "girl", "she"), ("Daisy", "girl", "she"),
    ("Molly", "girl", "she"), ("Ruby", "girl", "she"), ("Grace", "girl", "she"), ("Ava", "girl", "she"),
    ("Nora", "girl", "she"), ("Maya", "girl", "she"), ("Ivy", "girl", "she"), ("Jill", "girl", "she"),
    ("Tim", "boy", "he"), ("Ben", "boy", "he"), ("Tom", "boy", "he"), ("Max", "boy", "he"),
    ("Sam", "boy", "he"), ("Jack", "boy", "he"), ("Leo", "boy", "he"), ("Jake", "boy", "he"),
    ("Joe", "boy", "he"), ("Bob", "boy", "he"), ("Dan", "boy", "he"), ("Finn", "boy", "he"),
    ("Luke", "boy", "he"), ("Noah", "boy", "he"), ("Owen", "boy", "he"), ("Eli", "boy", "he"),
    ("Ned", "boy", "he"), ("Toby", "boy", "he"), ("Zack", "boy", "he"), ("Adam", "boy", "he"),
    ("Pip", "bunny", "he"), ("Rex", "puppy", "he"), ("Kitty", "kitten", "she"), ("Fluff", "kitten", "he"),
    ("Coco", "bunny", "she"), ("Buddy", "puppy", "he"), ("Rosie", "piglet", "she"), ("Chirp", "chick", "she"),
    ("Benny", "bear cub", "he"), ("Dot", "ladybird", "she"), ("Hoot", "owlet", "he"), ("Wally", "duckling", "he"),
]
DEMO_FRIENDS = ["Mom", "Dad", "Grandma", "Grandpa", "Ted", "Jen", "Liz", "Ron", "Meg", "Pam", "Ken",
                "Kate", "Nick", "Rita", "Olly", "Hugo", "Tess", "Gus", "Bea", "Milo"]
DEMO_PLACES = ["garden", "forest", "yard", "lake", "zoo", "school", "playground", "meadow", "river",
               "town", "kitchen", "backyard", "jungle", "field", "market", "farm", "woods", "street"]

# Templates: {name} hero, {He}/{he}/{His}/{his}/{him} pronouns, {kind} e.g. "girl", {friend},
# {place}, {noun}, {adj}, {a_adj} ("an old"), {verb} {verbs} {verbed} {verbing}.
INTRO_TEMPLATES = [
    "Once upon a time, there was a {kind} named {name}.",
    "There once was a {kind} called {name}.",
    "{name} was a {kind} who lived near the {place}.",
    "One day, a {kind} named {name} went to the {place}.",
    "Once there was a {kind} named {name} who lived in a little home by the {place}.",
    "In a town far away, there lived a {kind} named {name}.",
]
OBJECT_TEMPLATES = [
    "{He} had {a_adj} {noun} that {he} held dear.",
    "One day, {he} found {a_adj} {noun} in the {place}.",
    "At the {place}, {he} saw {a_adj} {noun}.",
    "{His} grandma gave {him} {a_adj} {noun} as a gift.",
    "{He} always kept {a_adj} {noun} next to {his} bed.",
    "On the way to the {place}, {he} came across {a_adj} {noun}.",
    "{name} had a favorite thing in the world: {a_adj} {noun}.",
]
SETTING_SENTENCES = [
    "The sky was blue and the birds were singing.",
    "It was a nice day, and everyone was outside.",
    "The wind blew through the town.",
    "Everyone in the town was out and about that day.",
    "It was the first day of spring.",
]
FRIEND_TEMPLATES = [
    "{name} had a good friend named {friend}.",
    "{friend} came along too.",
    "{His} friend {friend} was there as well.",
]
ACTION_TEMPLATES = [
    "{name} {verbed} with the {noun} all day.",
    "{He} wanted to {verb} with it every day.",
    "Then {he} {verbed} all the way to the {place}.",
    "{name} thought {verbing} was the best thing to do.",
    "Soon {name} and {friend} were {verbing} together.",
    "{He} tried to {verb}, but it was hard at first.",
    "{name} {verbed} again and again until the sun went down.",
    "{name} decided to {verb} in the {place}.",
    "Every morning, {name} {verbed} before breakfast.",
    "{He} had so much fun that {he} {verbed} all afternoon.",
]
AGAIN_TEMPLATES = [  # a second use of the verb, for stories with few features
    "Later, {he} {verbed} once more, just for fun.",
    "The next day, {name} went out {verbing} again.",
    "After that, {name} asked if {he} could {verb} every day.",
]
DIALOGUE_TEMPLATES = [
    '"Look at my {adj} {noun}!" {name} said to {friend}.',
    '"Can I {verb} too?" asked {friend}.',
    '{friend} said, "Wow, that {noun} is so {adj}!"',
    '{name} said, "Let\'s {verb} together!"',
    '"Be nice to the {noun}," said {friend}.',
    '"{name} {verbs} so well!" said {friend}.',
    '"What is that?" asked {friend}. "It is my {noun}," said {name}.',
]
CONFLICT_TEMPLATES = [  # (the conflict, how it resolves when the ending is good)
    ("But there was a problem: {friend} wanted the {noun} too.", "They talked it over and took turns."),
    ("Then a problem came up: the {noun} got stuck high in a tree.",
     "{friend} came with a big stick and got it down."),
    ("{friend} took the {noun}, and the two of them began to fight.",
     "Soon they said sorry and were friends again."),
    ("But there was a big problem: the {noun} fell into the pond.", "{friend} helped {name} get it back."),
    ("{name} and {friend} began to fight about who would go first.", "In the end, they went one by one."),
]
FORESHADOW_TEMPLATES = [
    "{name} did not know that the {noun} would soon be very important.",
    "Little did {he} know, this day would change everything.",
    "There was something odd about the {noun}, but {name} did not know it yet.",
]
TWIST_TEMPLATES = [
    "But then, to {his} surprise, the {noun} began to talk!",
    "Then came a surprise: the {noun} was a gift from {friend} all along.",
    "What a surprise it was when a bunny came out from behind the {noun}!",
    "To everyone's surprise, the {noun} could fly!",
]
HAPPY_ENDINGS = [
    "In the end, {name} was full of joy.",
    "From that day on, {name} and {friend} were best friends.",
    "It was the best day ever for {name}.",
    "That night, {name} went to sleep with a smile on {his} face.",
    "{name} went home feeling good inside.",
]
BAD_ENDINGS = [
    "In the end, the {noun} was gone, and {name} felt very sad.",
    "{name} never saw the {noun} again, and {he} was sad for a long time.",
    "Sadly, the {noun} broke into many pieces, and {name} went home alone.",
    "It was a sad day, and {name} cried and cried.",
]
MORAL_TEMPLATES = [
    "{name} learned that it is good to give to others.",
    "{name} learned an important lesson: always be nice to others.",
    "The lesson was clear: always do what your mom and dad say.",
    "That day, {name} learned that waiting your turn is the best way.",
    "{name} learned that telling the truth is always right.",
]
ALL_DEMO_TEMPLATES = (INTRO_TEMPLATES + OBJECT_TEMPLATES + SETTING_SENTENCES + FRIEND_TEMPLATES
                      + ACTION_TEMPLATES + AGAIN_TEMPLATES + DIALOGUE_TEMPLATES
                      + [s for pair in CONFLICT_TEMPLATES for s in pair]
                      + FORESHADOW_TEMPLATES + TWIST_TEMPLATES + HAPPY_ENDINGS + BAD_ENDINGS + MORAL_TEMPLATES)

_VOWELS = "aeiou"


def _double_final_consonant(verb):
    # one-syllable consonant-vowel-consonant verbs double it: hop -> hopped, but not row/fix/stay
    if len(verb) < 3 or verb[-1] in _VOWELS + "wxy":
        return False
    c1, v, c2 = verb[-3:]
    syllables = len(re.findall(r"[aeiou]+", verb))
    return c1 not in _VOWELS and v in _VOWELS and syllables == 1


def verb_forms(verb):
    """{base, third person -s, past -ed, -ing} by the regular English spelling rules:
    carry carries carried carrying; bake bakes baked baking; hop hops hopped hopping."""
    if re.search(r"(s|x|z|ch|sh)$", verb):
        third = verb + "es"
    elif re.search(r"[^aeiou]y$", verb):
        third = verb[:-1] + "ies"
    else:
        third = verb + "s"
    if verb.endswith("e"):
        past = verb + "d"
    elif re.search(r"[^aeiou]y$", verb):
        past = verb[:-1] + "ied"
    elif _double_final_consonant(verb):
        past = verb + verb[-1] + "ed"
    else:
        past = verb + "ed"
    if verb.endswith(("ee", "oe", "ye")) or not verb.endswith("e"):
        ing = verb + verb[-1] + "ing" if _double_final_consonant(verb) else verb + "ing"
    else:
        ing = verb[:-1] + "ing"
    return {verb, third, past, ing}


def _inflect(verb):
    forms = verb_forms(verb) - {verb}
    third = next(f for f in forms if f.endswith("s"))
    past = next(f for f in forms if f.endswith("ed"))
    ing = next(f for f in forms if f.endswith("ing"))
    return third, past, ing


def _with_article(word):
    # "an" before a vowel sound; "u" spelled with a "you" sound takes "a" (a unicorn, a useful)
    if word.startswith(("uni", "use", "eu")):
        return f"a {word}"
    return f"{'an' if word[0] in _VOWELS else 'a'} {word}"


def _capitalize(sentence):
    return sentence[0].upper() + sentence[1:]


def gpt_prompt(verb, noun, adjective, features):
    prompt = ("Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old "
              f'child would understand. The story should use the verb "{verb}", the noun "{noun}" and '
              f'the adjective "{adjective}".')
    if features:
        prompt += " The story has the following features: " + ", ".join(
            GPT_FEATURE_PHRASES[f] for f in features) + "."
    return prompt + " Remember to only use simple words!\n\nPossible story:"


def demo_story(rng, verb, noun, adjective, features):
    """A 3-6 sentence story that uses the three words and shows each feature."""
    name, kind, he = rng.choice(DEMO_HEROES)
    friend = rng.choice(DEMO_FRIENDS)
    third, past, ing = _inflect(verb)
    slots = dict(name=name, kind=kind, friend=friend, place=rng.choice(DEMO_PLACES),
                 he=he, He=he.capitalize(), his="his" if he == "he" else "her",
                 His="His" if he == "he" else "Her", him="him" if he == "he" else "her",
                 noun=noun, adj=adjective, a_adj=_with_article(adjective),
                 verb=verb, verbs=third, verbed=past, verbing=ing)

    def say(template):
        return _capitalize(template.format(**slots))

    opening = [say(rng.choice(INTRO_TEMPLATES)), say(rng.choice(OBJECT_TEMPLATES))]
    middle = [say(rng.choice(ACTION_TEMPLATES))]
    # plain sentences fill the stories with few features, so that all are 40-90 words long
    for extra in rng.sample(["setting", "friend", "again"], max(0, 2 - len(features))):
        if extra == "setting":
            opening.insert(1, rng.choice(SETTING_SENTENCES))
        elif extra == "friend":
            middle.insert(0, say(rng.choice(FRIEND_TEMPLATES)))
        else:
            middle.append(say(rng.choice(AGAIN_TEMPLATES)))
    if "Foreshadowing" in features:
        opening.append(say(rng.choice(FORESHADOW_TEMPLATES)))
    if "Conflict" in features:
        conflict, resolution = rng.choice(CONFLICT_TEMPLATES)
        middle.append(say(conflict))
        if "BadEnding" not in features:
            middle.append(say(resolution))
    if "Dialogue" in features:
        middle.insert(rng.randint(0, len(middle)), say(rng.choice(DIALOGUE_TEMPLATES)))
    if "Twist" in features:
        middle.append(say(rng.choice(TWIST_TEMPLATES)))
    ending = [say(rng.choice(BAD_ENDINGS if "BadEnding" in features else HAPPY_ENDINGS))]
    if "MoralValue" in features:
        ending.append(say(rng.choice(MORAL_TEMPLATES)))
    paragraphs = [" ".join(opening), " ".join(middle), " ".join(ending)]
    summary = f"{name} finds {_with_article(adjective)} {noun} and {third} with it."
    return "\n\n" + "\n\n".join(paragraphs), summary


def demo_record(rng):
    verb, noun, adjective = rng.choice(DEMO_VERBS), rng.choice(DEMO_NOUNS), rng.choice(DEMO_ADJECTIVES)
    # about half the stories have a dialogue; 0-2 features in all
    features = ["Dialogue"] if rng.random() < 0.5 else []
    others = [f for f in GPT_FEATURE_PHRASES if f != "Dialogue"]
    n_others = rng.choice([0, 1] if features else [0, 1, 1, 2])
    features += rng.sample(others, n_others)
    rng.shuffle(features)
    story, summary = demo_story(rng, verb, noun, adjective, features)
    return {"story": story,
            "instruction": {"prompt:": gpt_prompt(verb, noun, adjective, features),
                            "words": [verb, noun, adjective], "features": features},
            "summary": summary, "source": "GPT-4"}


def make_demo(data_dir, num_shards, stories_per_shard, seed):
    out_dir = shards_dir(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in tqdm(range(num_shards), desc="make_demo", unit="shard"):
        rng = random.Random(f"tinystories-demo-{seed}-{shard}")  # each shard reproducible on its own
        records = [demo_record(rng) for _ in range(stories_per_shard)]
        path = os.path.join(out_dir, f"data{shard:02d}.json")
        write_json_atomic(path, records)
        paths.append(path)
    return paths


def cmd_make_demo(args):
    paths = make_demo(args.data_dir, args.num_shards, args.stories_per_shard, args.seed)
    print(f"make_demo: {len(paths)} shards x {args.stories_per_shard} stories (seed {args.seed}) "
          f"in {shards_dir(args.data_dir)}")


# -----------------------------------------------------------------------------
# train_vocab: sentencepiece BPE with llama2.c's settings

def tokenizer_model_path(data_dir, vocab_size):
    return os.path.join(data_dir, f"tok{vocab_size}.model")


def train_vocab(data_dir, vocab_size, num_shards, include_prompts=False):
    """llama2.c's tokenizer training. include_prompts adds each record's instruction prompt (the
    template prompt_style of prepare_instruct_data) to the text, so that a small vocabulary also
    spends pieces on the instruction's words: shorter instruct examples, at the price of
    departing from llama2.c's stories-only tokenizers."""
    import sentencepiece as spm
    from prepare_instruct_data import record_prompt_and_story
    from tokenizer import Tokenizer

    shards = list_shards(data_dir)[:num_shards]
    os.makedirs(data_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="train_vocab_", dir=data_dir)
    try:
        text_path = os.path.join(work_dir, "stories.txt")
        n_stories = 0
        with open(text_path, "w", encoding="utf-8") as f:
            for shard in tqdm(shards, desc="train_vocab: writing text", unit="shard"):
                for record in iter_json_records(shard):
                    story = record.get("story") if isinstance(record, dict) else None
                    if isinstance(story, str) and story.strip():
                        f.write(story.strip() + "\n")
                        n_stories += 1
                    prompt = record_prompt_and_story(record, "template")[0] if include_prompts else None
                    if prompt:
                        f.write(prompt + "\n")
        if n_stories == 0:
            raise DataError(f"train_vocab: no stories in {', '.join(shards)}")
        print(f"train_vocab: training sentencepiece BPE ({vocab_size} tokens) on {n_stories} stories...",
              file=sys.stderr)
        prefix = os.path.join(work_dir, "tok")
        try:
            spm.SentencePieceTrainer.train(
                input=text_path, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                self_test_sample_size=0, input_format="text", character_coverage=1.0,
                num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
                byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                minloglevel=2)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[0].split("] ")[-1]
            raise DataError(f"train_vocab --vocab_size={vocab_size} failed: {detail}") from None
        model_path = tokenizer_model_path(data_dir, vocab_size)
        os.replace(prefix + ".model", model_path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    Tokenizer(model_path).export(os.path.splitext(model_path)[0] + ".bin")
    return model_path, n_stories


def cmd_train_vocab(args):
    model_path, n_stories = train_vocab(args.data_dir, args.vocab_size, args.num_shards, args.include_prompts)
    print(f"train_vocab: {model_path} (and .bin) from {n_stories} stories")


# -----------------------------------------------------------------------------
# pretokenize: one uint16 .bin per shard, shards in parallel

def resolve_tokenizer(data_dir, vocab_size, tokenizer_path=None):
    """The tokenizer for --vocab_size (N=0: the --tokenizer file), checked to fit the data."""
    from tokenizer import Tokenizer, TokenizerError

    path = tokenizer_path or tokenizer_model_path(data_dir, vocab_size)
    if not os.path.isfile(path):
        if tokenizer_path:
            raise DataError(f"tokenizer {path}: no such file (expected a sentencepiece .model)")
        raise DataError(f"tokenizer {path} not found: run `python tinystories.py train_vocab "
                        f"--vocab_size={vocab_size} --data_dir={data_dir}` first")
    try:
        tok = Tokenizer(path)
    except TokenizerError as exc:
        raise DataError(str(exc)) from None
    if vocab_size and tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} tokens, not --vocab_size={vocab_size}")
    if tok.vocab_size > 65536:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} tokens, too many for uint16 shards")
    return path


_worker_tokenizers = {}


def worker_tokenizer(path):
    from tokenizer import Tokenizer
    if path not in _worker_tokenizers:
        _worker_tokenizers[path] = Tokenizer(path)
    return _worker_tokenizers[path]


def pretokenize_shard(shard_path, tokenizer_path, out_path, flush_tokens=1 << 16):
    """Tokenize one JSON shard into out_path, streaming records in and tokens out."""
    shard = os.path.basename(shard_path)
    tmp = f"{out_path}.tmp"
    try:
        tok = worker_tokenizer(tokenizer_path)
        n_stories = n_tokens = n_skipped = 0
        pending = []
        with open(tmp, "wb") as f:
            for record in iter_json_records(shard_path):
                story = record.get("story") if isinstance(record, dict) else None
                if not isinstance(story, str) or not story.strip():
                    n_skipped += 1
                    continue
                pending.extend(tok.encode(story.strip(), bos=True))
                n_stories += 1
                if len(pending) >= flush_tokens:
                    np.asarray(pending, dtype=np.uint16).tofile(f)
                    n_tokens += len(pending)
                    pending = []
            np.asarray(pending, dtype=np.uint16).tofile(f)
            n_tokens += len(pending)
        os.replace(tmp, out_path)
    except Exception as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ShardError(f"{shard}: {exc}") from None
    return {"shard": shard, "stories": n_stories, "tokens": n_tokens, "skipped": n_skipped,
            "peak_rss_mb": worker_peak_rss_mb(), "cpu_s": time.process_time(), "pid": os.getpid()}


def pretokenize(data_dir, vocab_size, workers, tokenizer_path=None):
    shards = list_shards(data_dir)
    tokenizer_path = resolve_tokenizer(data_dir, vocab_size, tokenizer_path)
    out_dir = os.path.join(data_dir, f"tok{vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(shard, tokenizer_path, os.path.join(out_dir, os.path.basename(shard).replace(".json", ".bin")))
            for shard in shards]
    results = run_shard_jobs(pretokenize_shard, jobs, workers, desc="pretokenize")
    return out_dir, sorted(results, key=lambda r: r["shard"])


def cmd_pretokenize(args):
    try:
        out_dir, results = pretokenize(args.data_dir, args.vocab_size, args.workers, args.tokenizer)
    except ShardError as exc:
        raise DataError(f"pretokenize failed on shard {exc}") from None
    stories = sum(r["stories"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    skipped = sum(r["skipped"] for r in results)
    print(f"pretokenize: {len(results)} shards, {stories} stories, {tokens} tokens -> {out_dir}"
          + (f" ({skipped} records without a story skipped)" if skipped else ""))


# -----------------------------------------------------------------------------
# command line

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def vocab_size_arg(text, allow_zero=True):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero) or value > 65536:
        low = 0 if allow_zero else 1
        raise argparse.ArgumentTypeError(f"expected {low}..65536 (uint16 shards), got {value}")
    return value


def sha256_arg(text):
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"expected 64 hex digits, got {text!r}")
    return text.lower()


def url_arg(text):
    if not re.match(r"https?://", text):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def build_parser():
    parser = OneLineArgumentParser(prog="tinystories.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=OneLineArgumentParser)

    def add(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data_dir", default="data", help="data folder (default: data)")
        return p

    p = add("download", "download and unpack TinyStories_all_data.tar.gz")
    p.add_argument("--url", type=url_arg, help=f"mirror URL (default: ${URL_ENV_VAR} or Hugging Face)")
    p.add_argument("--sha256", type=sha256_arg, help="expected sha256 of the archive")
    p.add_argument("--retries", type=positive_int, default=6, help="retries per failure streak (default 6)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling (default 1)")
    p.set_defaults(func=cmd_download)

    p = add("make_demo", "write an offline demo corpus in the archive's format")
    p.add_argument("--num_shards", type=positive_int, default=4, help="shards to write (default 4)")
    p.add_argument("--stories_per_shard", type=positive_int, default=5000, help="default 5000")
    p.add_argument("--seed", type=int, default=1337, help="default 1337")
    p.set_defaults(func=cmd_make_demo)

    p = add("train_vocab", "train a sentencepiece BPE tokenizer -> {data_dir}/tok{N}.model")
    p.add_argument("--vocab_size", type=lambda t: vocab_size_arg(t, allow_zero=False), required=True)
    p.add_argument("--include_prompts", action="store_true",
                   help="also train on each record's instruction prompt (not llama2.c's recipe)")
    p.add_argument("--num_shards", type=positive_int, default=10, help="train on the first shards (default 10)")
    p.set_defaults(func=cmd_train_vocab)

    p = add("pretokenize", "tokenize every shard -> {data_dir}/tok{N}/dataNN.bin")
    p.add_argument("--vocab_size", type=vocab_size_arg, required=True, help="0 = the --tokenizer model")
    p.add_argument("--tokenizer", help="sentencepiece .model (required for --vocab_size=0)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="processes (default: CPUs)")
    p.set_defaults(func=cmd_pretokenize)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "vocab_size", None) == 0 and not args.tokenizer:
        parser.error("--vocab_size=0 needs --tokenizer=PATH (the Llama 2 tokenizer.model)")
    try:
        args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions: name the file, skip the traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
