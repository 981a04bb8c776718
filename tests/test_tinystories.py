"""tinystories.py: the demo corpus, streaming JSON shards, train_vocab and pretokenize, end to end
on the demo corpus and on real TinyStories text."""
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

import demo_corpus
import prompts
import shards
import tinystories
from helpers import ROOT, assert_refused, run_main, write_shards
from tokenizer import Tokenizer


def real_stories(shared_data):
    text = open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8").read()
    return [s for s in text.split("<|endoftext|>") if s.strip()]


def stories_of(data_dir):
    return [[r["story"] for r in json.load(open(p))] for p in shards.list_shards(str(data_dir))]


def decoded_stories(bin_path, tok):
    tokens = np.fromfile(bin_path, dtype=np.uint16).tolist()
    assert tokens and tokens[0] == tok.bos_id
    starts = [i for i, t in enumerate(tokens) if t == tok.bos_id] + [len(tokens)]
    return [tok.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]


# -----------------------------------------------------------------------------
# demo corpus

def test_verb_forms_follow_regular_spelling_rules():
    expected = {
        "hop": {"hop", "hops", "hopped", "hopping"},
        "bake": {"bake", "bakes", "baked", "baking"},
        "carry": {"carry", "carries", "carried", "carrying"},
        "play": {"play", "plays", "played", "playing"},
        "fix": {"fix", "fixes", "fixed", "fixing"},
        "wash": {"wash", "washes", "washed", "washing"},
        "buzz": {"buzz", "buzzes", "buzzed", "buzzing"},
        "visit": {"visit", "visits", "visited", "visiting"},
        "agree": {"agree", "agrees", "agreed", "agreeing"},
        "stir": {"stir", "stirs", "stirred", "stirring"},
        "row": {"row", "rows", "rowed", "rowing"},
        "look": {"look", "looks", "looked", "looking"},
        "rescue": {"rescue", "rescues", "rescued", "rescuing"},
        "climb": {"climb", "climbs", "climbed", "climbing"},
    }
    for verb, forms in expected.items():
        assert demo_corpus.verb_forms(verb) == forms, verb


def test_word_lists_are_large_simple_and_regular():
    lists = {"verbs": demo_corpus.DEMO_VERBS, "nouns": demo_corpus.DEMO_NOUNS,
             "adjectives": demo_corpus.DEMO_ADJECTIVES}
    for kind, words in lists.items():
        assert len(words) >= 200, kind
        assert len(set(words)) == len(words), kind
        assert all(re.fullmatch(r"[a-z]{2,12}", w) for w in words), kind
    for verb in demo_corpus.DEMO_VERBS:
        forms = demo_corpus.verb_forms(verb)
        assert len(forms) == 4, verb
        assert sum(f.endswith("ed") for f in forms) >= 1 and sum(f.endswith("ing") for f in forms) >= 1


def test_templates_never_use_list_words_themselves():
    # a list word in a story must come from the instruction, or "uses the verb" means nothing
    words = (set(demo_corpus.DEMO_NOUNS) | set(demo_corpus.DEMO_ADJECTIVES)
             | {f for v in demo_corpus.DEMO_VERBS for f in demo_corpus.verb_forms(v)})
    fixed = [re.sub(r"\{\w+\}", " ", t) for t in demo_corpus.ALL_DEMO_TEMPLATES]
    fixed += [f"{name} {kind}" for name, kind, _ in demo_corpus.DEMO_HEROES]
    fixed += demo_corpus.DEMO_FRIENDS + demo_corpus.DEMO_PLACES
    used = set(re.findall(r"[a-z]+", " ".join(fixed).lower()))
    assert used & words == set()


@pytest.fixture(scope="module")
def demo_records():
    rng = random.Random(2024)
    return [demo_corpus.demo_record(rng) for _ in range(3000)]


def test_demo_stories_use_the_three_words(demo_records):
    for record in demo_records:
        verb, noun, adjective = record["instruction"]["words"]
        story_words = set(re.findall(r"[a-z']+", record["story"].lower()))
        assert noun in story_words and adjective in story_words, record
        assert demo_corpus.verb_forms(verb) & story_words, record
        assert verb in demo_corpus.DEMO_VERBS and noun in demo_corpus.DEMO_NOUNS
        assert adjective in demo_corpus.DEMO_ADJECTIVES


def test_demo_features_change_the_story(demo_records):
    counts = {feature: 0 for feature in demo_corpus.DEMO_FEATURE_MARKERS}
    for record in demo_records:
        features = record["instruction"]["features"]
        assert len(features) <= 2 and len(set(features)) == len(features)
        for feature, marker in demo_corpus.DEMO_FEATURE_MARKERS.items():
            present = re.search(marker, record["story"], flags=re.IGNORECASE) is not None
            assert present == (feature in features), (feature, record["story"])
            counts[feature] += feature in features
    assert 0.4 < counts["Dialogue"] / len(demo_records) < 0.6
    assert all(n > 100 for n in counts.values()), counts
    # a bad ending replaces the happy one
    for record in demo_records:
        last = record["story"].strip().split("\n\n")[-1]
        assert ("BadEnding" in record["instruction"]["features"]) == bool(re.search(r"\bsad", last, re.I))


def test_demo_stories_are_short_and_varied(demo_records):
    lengths = [len(r["story"].split()) for r in demo_records]
    assert 35 <= min(lengths) and max(lengths) <= 95
    assert 45 <= sum(lengths) / len(lengths) <= 70
    stories = [r["story"] for r in demo_records]
    assert len(set(stories)) == len(stories)
    openings = {s.strip().split(".")[0].split(" named ")[0] for s in stories}
    assert len(openings) >= 5
    names = {re.search(r"named (\w+)|called (\w+)|^(\w+) was", s.strip()) is not None for s in stories}
    assert names == {True}


def test_make_demo_writes_the_archive_format_deterministically(tmp_path, capsys):
    args = ["make_demo", "--num_shards=2", "--stories_per_shard=50", "--seed=5"]
    assert tinystories.main(args + [f"--data_dir={tmp_path / 'a'}"]) == 0
    assert tinystories.main(args + [f"--data_dir={tmp_path / 'b'}"]) == 0
    assert tinystories.main(["make_demo", "--num_shards=2", "--stories_per_shard=50", "--seed=6",
                             f"--data_dir={tmp_path / 'c'}"]) == 0
    assert "2 shards x 50 stories" in capsys.readouterr().out
    shard_dir = tmp_path / "a" / "TinyStories_all_data"
    assert sorted(os.listdir(shard_dir)) == ["data00.json", "data01.json"]
    for name in ("data00.json", "data01.json"):
        a = (shard_dir / name).read_bytes()
        assert a == (tmp_path / "b" / "TinyStories_all_data" / name).read_bytes()
        assert a != (tmp_path / "c" / "TinyStories_all_data" / name).read_bytes()
    records = json.loads((shard_dir / "data00.json").read_text())
    assert len(records) == 50
    for r in records:
        assert set(r) == {"story", "instruction", "summary", "source"} and r["source"] == "GPT-4"
        assert r["story"].startswith("\n\n") and r["story"].strip()
        assert set(r["instruction"]) == {"prompt:", "words", "features"}
        verb, noun, adjective = r["instruction"]["words"]
        prompt = r["instruction"]["prompt:"]
        assert prompt.startswith("Write a short story (3-5 paragraphs) which only uses very simple words")
        assert f'the verb "{verb}", the noun "{noun}" and the adjective "{adjective}".' in prompt
        assert prompt.endswith(" Remember to only use simple words!\n\nPossible story:")
        assert ("The story has the following features:" in prompt) == bool(r["instruction"]["features"])
        assert set(r["instruction"]["features"]) <= set(prompts.GPT_FEATURE_PHRASES)


# -----------------------------------------------------------------------------
# streaming JSON

def test_iter_json_records_matches_json_load_across_chunk_borders(tmp_path):
    records = [{"story": "a [tricky], \"quoted\" {story}\n", "n": 12345678901234},
               [1, 2, [3]], "plain string", 3.25, None, True, {"nested": {"x": ["]", ","]}}, 1234567]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(records, indent=1))
    for chunk in (1, 3, 7, 64, 1 << 20):
        assert list(shards.iter_json_records(str(path), chunk_chars=chunk)) == records
    path.write_text("  [ ]  ")
    assert list(shards.iter_json_records(str(path), chunk_chars=2)) == []


@pytest.mark.parametrize("text, message", [
    ('{"story": "x"}', "not a JSON list"),
    ('[{"story": "x"}, {"story": ', "ends early|invalid JSON"),
    ('[{"story": "x"} {"story": "y"}]', "expected ','"),
    ('[{"story": x}]', "invalid JSON"),
    ('[{"story": "x"}] trailing', "extra data"),
])
def test_iter_json_records_rejects_broken_files(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        list(shards.iter_json_records(str(path), chunk_chars=4))


# -----------------------------------------------------------------------------
# train_vocab and pretokenize

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo") / "data"
    demo_corpus.make_demo(str(data_dir), num_shards=3, stories_per_shard=150, seed=3)
    return data_dir


def test_train_vocab_and_pretokenize_on_demo_corpus(demo_data, capsys):
    assert tinystories.main(["train_vocab", "--vocab_size=400", "--num_shards=2", f"--data_dir={demo_data}"]) == 0
    model = demo_data / "tok400.model"
    assert model.exists() and (demo_data / "tok400.bin").exists()
    assert [p for p in os.listdir(demo_data) if "train_vocab" in p or p.endswith(".txt")] == []
    tok = Tokenizer(str(model))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (400, 1, 2, 0)

    assert tinystories.main(["pretokenize", "--vocab_size=400", "--workers=2", f"--data_dir={demo_data}"]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 450 stories" in out
    bins = sorted(os.listdir(demo_data / "tok400"))
    assert bins == ["data00.bin", "data01.bin", "data02.bin"]
    for bin_name, stories in zip(bins, stories_of(demo_data)):
        assert decoded_stories(demo_data / "tok400" / bin_name, tok) == [s.strip() for s in stories]


def test_train_vocab_include_prompts_shortens_the_instructions(tmp_path):
    """--include_prompts spends pieces on the instruction's own words: the same prompt takes far
    fewer tokens, while stories still round-trip."""
    from prompts import build_prompt, prompt_ids
    data_dir = tmp_path / "data"
    demo_corpus.make_demo(str(data_dir), num_shards=2, stories_per_shard=400, seed=5)
    lengths = {}
    for flag in ([], ["--include_prompts"]):
        assert tinystories.main(["train_vocab", "--vocab_size=600", f"--data_dir={data_dir}", *flag]) == 0
        tok = Tokenizer(str(data_dir / "tok600.model"))
        prompt = build_prompt("climb", "ring", "messy", ["Dialogue"])
        lengths[bool(flag)] = len(prompt_ids(tok, prompt, instruct=True))
        story = stories_of(data_dir)[1][0].strip()
        assert tok.decode(tok.encode(story)) == story
    assert lengths[True] < 0.7 * lengths[False], lengths


def test_pretokenize_real_text(shared_data, tmp_path):
    stories = real_stories(shared_data)
    assert len(stories) == 177
    data_dir = tmp_path / "data"
    # a record with no story text is skipped, not fatal
    write_shards(data_dir, [[{"story": s} for s in stories[:60]], [{"story": s} for s in stories[60:]] + [{}]])
    assert tinystories.main(["train_vocab", "--vocab_size=512", f"--data_dir={data_dir}"]) == 0
    tok = Tokenizer(str(data_dir / "tok512.model"))
    assert tinystories.main(["pretokenize", "--vocab_size=512", "--workers=2", f"--data_dir={data_dir}"]) == 0
    decoded = decoded_stories(data_dir / "tok512" / "data00.bin", tok)
    decoded += decoded_stories(data_dir / "tok512" / "data01.bin", tok)
    assert decoded == [s.strip() for s in stories]
    # exactly BOS + encode(strip), no EOS
    first = np.fromfile(data_dir / "tok512" / "data00.bin", dtype=np.uint16)
    expected = tok.encode(stories[0].strip(), bos=True)
    assert first[:len(expected)].tolist() == expected and first[len(expected)] == tok.bos_id
    assert tok.eos_id not in first.tolist()


def test_pretokenize_with_a_given_tokenizer_for_vocab_0(shared_data, demo_data):
    given = os.path.join(shared_data, "tok512.model")
    assert tinystories.main(["pretokenize", "--vocab_size=0", f"--tokenizer={given}", "--workers=1",
                             f"--data_dir={demo_data}"]) == 0
    tok = Tokenizer(given)
    first_shard = stories_of(demo_data)[0]
    assert decoded_stories(demo_data / "tok0" / "data00.bin", tok) == [s.strip() for s in first_shard]


def test_pretokenize_worker_error_names_the_shard(tmp_path, capsys):
    data_dir = tmp_path / "data"
    demo_corpus.make_demo(str(data_dir), num_shards=3, stories_per_shard=20, seed=1)
    assert tinystories.main(["train_vocab", "--vocab_size=300", f"--data_dir={data_dir}"]) == 1
    assert "vocab_size" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (data_dir / "tok300.model").exists()
    assert tinystories.main(["train_vocab", "--vocab_size=384", f"--data_dir={data_dir}"]) == 0
    with open(data_dir / "TinyStories_all_data" / "data01.json", "a") as f:
        f.write("garbage")  # a broken shard in the middle
    capsys.readouterr()
    assert tinystories.main(["pretokenize", "--vocab_size=384", "--workers=2", f"--data_dir={data_dir}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^error: pretokenize failed on shard data01\.json: .*", err.strip().splitlines()[-1])
    assert not (data_dir / "tok384" / "data01.bin").exists()
    assert [p for p in os.listdir(data_dir / "tok384") if p.endswith(".tmp")] == []


def test_missing_data_and_tokenizer_are_explained(tmp_path, capsys):
    assert tinystories.main(["pretokenize", "--vocab_size=512", f"--data_dir={tmp_path}"]) == 2  # bad input
    assert "make_demo" in capsys.readouterr().err
    demo_corpus.make_demo(str(tmp_path), num_shards=1, stories_per_shard=5, seed=1)
    capsys.readouterr()
    assert tinystories.main(["pretokenize", "--vocab_size=512", f"--data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_vocab --vocab_size=512" in err


@pytest.mark.parametrize("argv, fragment", [
    ([], "COMMAND"),
    (["shuffle"], "shuffle"),
    (["train_vocab"], "--vocab_size"),
    (["train_vocab", "--vocab_size=abc"], "abc"),
    (["train_vocab", "--vocab_size=0"], "--vocab_size"),
    (["pretokenize", "--vocab_size=70000"], "65536"),
    (["pretokenize", "--vocab_size=0"], "--tokenizer"),
    (["pretokenize", "--vocab_size=512", "--workers=0"], "--workers"),
    (["make_demo", "--num_shards=-1"], "--num_shards"),
    (["download", "--sha256=xyz"], "64 hex"),
    (["download", "--url=ftp://example.com/x"], "http"),
])
def test_cli_misuse_is_one_line_and_exit_2(argv, fragment, capsys):
    assert_refused(run_main(tinystories.main, capsys, *argv), fragment)


def test_script_runs_as_a_command(tmp_path):
    run = subprocess.run([sys.executable, "tinystories.py", "make_demo", f"--data_dir={tmp_path}",
                          "--num_shards=1", "--stories_per_shard=3"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(json.load(open(tmp_path / "TinyStories_all_data" / "data00.json"))) == 3
    run = subprocess.run([sys.executable, "tinystories.py", "pretokenize", "--vocab_size=64",
                          f"--data_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr  # no tok64.model: bad input
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]


def test_progress_into_a_log_file_is_a_line_every_ten_percent(tmp_path):
    """Redirected to a file, a bar's redraws would stay as hundreds of carriage-return lines: a
    plain line at every 10% instead (the summary lines still follow)."""
    done = subprocess.run([sys.executable, "tinystories.py", "make_demo", f"--data_dir={tmp_path}",
                           "--num_shards=40", "--stories_per_shard=2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    bar_lines = [line for line in done.stderr.splitlines() if line.startswith("make_demo:")]
    assert [re.search(r"(\d+)%\|.*\| (\d+)/40", line).group(1, 2) for line in bar_lines] == \
        [(str(p), str(p * 40 // 100)) for p in range(0, 101, 10)]
