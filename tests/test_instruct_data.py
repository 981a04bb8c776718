"""prepare_instruct_data.py: prompt + BOS + story + EOS rows, loss mask lengths, skipped and
dropped records, on the demo corpus and on real story text."""
import json
import os
import random

import numpy as np
import pytest

import demo_corpus
import prepare_instruct_data as pid
import prompts
import tinystories
from helpers import assert_refused, run_main, write_shards
from prompts import build_prompt, rewrite_original_prompt
from tokenizer import Tokenizer


def load_outputs(out_dir, stem):
    tokens = np.load(os.path.join(out_dir, f"{stem}.tokens.npy"), mmap_mode="r")
    lengths = np.load(os.path.join(out_dir, f"{stem}.lengths.npy"), mmap_mode="r")
    return tokens, lengths


def loader_labels(row, prompt_len, total_len):
    """The training loader's rule, as documented: y[i] = -1 unless prompt_len <= i+1 < total_len."""
    x, y = row[:-1].astype(np.int64), row[1:].astype(np.int64)
    i = np.arange(len(y))
    y = np.where((prompt_len <= i + 1) & (i + 1 < total_len), y, -1)
    return x, y


def prompt_tokens(record, prompt_for, tok):
    """The documented encoding: each requested word, quoted in the prompt's text, is encoded as a
    story spells it, with a space before it ('"climb"' is read as '" climb"')."""
    text = prompt_for(record)
    for word in record["instruction"]["words"]:
        text = text.replace(f'"{word.strip()}"', f'" {word.strip()}"')
    return tok.encode(text)


def check_rows(tokens, lengths, records, prompt_for, tok, max_seq_len):
    """Every kept row is prompt + BOS + story + EOS, zero padded, for the records in order."""
    assert tokens.dtype == np.uint16 and tokens.shape == (len(records), max_seq_len)
    assert lengths.dtype == np.int32 and lengths.shape == (len(records), 2)
    for row, (prompt_len, total_len), record in zip(tokens, lengths, records):
        row = np.asarray(row)
        prompt_ids = prompt_tokens(record, prompt_for, tok)
        story_ids = tok.encode(record["story"].strip())
        assert prompt_len == len(prompt_ids) and total_len == len(prompt_ids) + len(story_ids) + 2
        assert row[:prompt_len].tolist() == prompt_ids
        assert row[prompt_len] == tok.bos_id and row[total_len - 1] == tok.eos_id
        assert tok.decode(row[prompt_len + 1:total_len - 1]) == record["story"].strip()
        assert not row[total_len:].any()
        x, y = loader_labels(row, prompt_len, total_len)
        # the loss sees BOS, the story and EOS, and nothing of the prompt or the padding
        assert y[y >= 0].tolist() == [tok.bos_id] + story_ids + [tok.eos_id]
        assert (y[:prompt_len - 1] == -1).all() and (y[total_len - 1:] == -1).all()


def example_size(record, prompt_for, tok):
    return len(prompt_tokens(record, prompt_for, tok)) + len(tok.encode(record["story"].strip())) + 2


def kept(records, prompt_for, tok, max_seq_len):
    return [r for r in records if example_size(r, prompt_for, tok) <= max_seq_len]


def template_prompt(record):
    words = record["instruction"]["words"]
    return build_prompt(words[0], words[1], words[2], record["instruction"]["features"])


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("instruct") / "data"
    demo_corpus.make_demo(str(data_dir), num_shards=2, stories_per_shard=120, seed=11)
    assert tinystories.main(["train_vocab", "--vocab_size=384", f"--data_dir={data_dir}"]) == 0
    return data_dir


def shard_records(data_dir, stem):
    return json.load(open(os.path.join(data_dir, "TinyStories_all_data", f"{stem}.json")))


def test_template_examples_and_labels(demo_data, capsys):
    assert pid.main(["--vocab_size=384", f"--data_dir={demo_data}", "--workers=2"]) == 0
    out_dir = demo_data / "instruct384"
    tok = Tokenizer(str(demo_data / "tok384.model"))
    val = kept(shard_records(demo_data, "data00"), template_prompt, tok, 350)
    train = kept(shard_records(demo_data, "data01"), template_prompt, tok, 350)
    assert f"240 records -> {len(val) + len(train)} examples (val {len(val)}, train {len(train)})" \
        in capsys.readouterr().out
    for stem, records in (("data00", val), ("data01", train)):
        tokens, lengths = load_outputs(out_dir, stem)
        assert isinstance(tokens, np.memmap)
        check_rows(tokens, lengths, records, template_prompt, tok, 350)
    meta = json.load(open(out_dir / "meta.json"))
    assert meta["vocab_size"] == 384 and meta["max_seq_len"] == 350 and meta["prompt_style"] == "template"
    assert meta["prompt_format"] == {"is_instruct": True, "prompt_encoding": "story_words"}
    assert meta["tokenizer"] == os.path.abspath(demo_data / "tok384.model")
    assert (meta["examples"], meta["val_examples"], meta["train_examples"]) == (
        len(val) + len(train), len(val), len(train))
    assert meta["dropped_too_long"] == 240 - len(val) - len(train) and meta["skipped"] == {}
    assert meta["shards"] == ["data00", "data01"] and meta["val_shards"] == ["data00"]
    assert not [p for p in os.listdir(out_dir) if p.endswith(".tmp")]


def test_a_requested_word_has_the_same_tokens_in_the_prompt_as_in_a_story(demo_data):
    """The model copies a requested word from its prompt: the prompt must hold the very tokens a
    story writes for it, the first piece's leading "▁" included; the prompt's text is unchanged."""
    tok = Tokenizer(str(demo_data / "tok384.model"))
    prompt = build_prompt("climb", "dragon", "messy", ["Dialogue"])
    ids = prompts.prompt_ids(tok, prompt, instruct=True)
    assert ids[-1] == tok.bos_id
    for word in ("climb", "dragon", "messy"):
        in_story = tok.encode(f"Lily saw the {word} one.")
        story_pieces = tok.encode(word)  # sentencepiece's dummy prefix: the word after a space
        assert tok.sp.id_to_piece(story_pieces[0]).startswith("\u2581")
        assert any(in_story[i:i + len(story_pieces)] == story_pieces for i in range(len(in_story)))
        assert any(ids[i:i + len(story_pieces)] == story_pieces for i in range(len(ids))), word
    assert tok.decode(ids[:-1]) == prompt.replace('"climb"', '" climb"').replace(
        '"dragon"', '" dragon"').replace('"messy"', '" messy"')
    assert 'the verb "climb"' in prompt  # the text users read and type keeps the original wording
    assert prompts.prompt_ids(tok, "Once upon a time", instruct=False) == tok.encode("Once upon a time", bos=True)


def test_plain_prompt_encoding_is_the_originals(demo_data):
    """--prompt_encoding=plain: the prompt's text encoded as it is, as the original project did."""
    assert pid.main(["--vocab_size=384", f"--data_dir={demo_data}", "--prompt_encoding=plain", "--workers=1"]) == 0
    tok = Tokenizer(str(demo_data / "tok384.model"))
    tokens, lengths = load_outputs(demo_data / "instruct384", "data00")
    records = [r for r in shard_records(demo_data, "data00")
               if len(tok.encode(template_prompt(r))) + len(tok.encode(r["story"].strip())) + 2 <= 350]
    assert len(records) == len(tokens)
    for row, (prompt_len, _), record in zip(tokens, lengths, records):
        assert row[:prompt_len].tolist() == tok.encode(template_prompt(record))
    assert json.load(open(demo_data / "instruct384" / "meta.json"))["prompt_format"]["prompt_encoding"] == "plain"


def test_original_prompt_style(demo_data):
    assert pid.main(["--vocab_size=384", f"--data_dir={demo_data}", "--prompt_style=original", "--workers=1"]) == 0
    tok = Tokenizer(str(demo_data / "tok384.model"))
    records = shard_records(demo_data, "data01")
    tokens, lengths = load_outputs(demo_data / "instruct384", "data01")

    def original_prompt(record):
        return rewrite_original_prompt(record["instruction"]["prompt:"])

    check_rows(tokens, lengths, kept(records, original_prompt, tok, 350), original_prompt, tok, 350)
    first = tok.decode(tokens[0][:lengths[0][0]])
    assert first.startswith("Write a story. The story should use the verb") and first.endswith(" Possible story:")
    assert json.load(open(demo_data / "instruct384" / "meta.json"))["prompt_style"] == "original"


def test_too_long_examples_are_dropped_and_counted(demo_data, capsys):
    max_seq_len = 260
    tok = Tokenizer(str(demo_data / "tok384.model"))
    records = shard_records(demo_data, "data00") + shard_records(demo_data, "data01")
    too_long = len(records) - len(kept(records, template_prompt, tok, max_seq_len))
    assert 0 < too_long < len(records)  # the cut must bite, but not everywhere

    assert pid.main(["--vocab_size=384", f"--data_dir={demo_data}", f"--max_seq_len={max_seq_len}"]) == 0
    assert f"dropped {too_long} longer than {max_seq_len} tokens" in capsys.readouterr().out
    meta = json.load(open(demo_data / "instruct384" / "meta.json"))
    assert meta["dropped_too_long"] == too_long and meta["examples"] == len(records) - too_long
    for stem in ("data00", "data01"):
        tokens, lengths = load_outputs(demo_data / "instruct384", stem)
        records = kept(shard_records(demo_data, stem), template_prompt, tok, max_seq_len)
        check_rows(tokens, lengths, records, template_prompt, tok, max_seq_len)


def test_malformed_records_are_counted_per_reason(demo_data, tmp_path, capsys):
    good = shard_records(demo_data, "data00")[:5]

    def with_instruction(**changes):
        record = json.loads(json.dumps(good[0]))
        record["instruction"].update(changes)
        return record

    bad = {
        "not_a_record": ["just a string", 42],
        "no_story": [{"instruction": good[0]["instruction"]}, dict(good[0], story=None)],
        "empty_story": [dict(good[0], story="  \n\n ")],
        "no_instruction": [{"story": "A story."}, dict(good[0], instruction="oops")],
        "bad_words": [with_instruction(words=["run", "dog"]), with_instruction(words=["run", 3, "big"]),
                      with_instruction(words="run dog big"), with_instruction(words=["run", "", "big"])],
        "bad_features": [with_instruction(features="Dialogue"), with_instruction(features=[1])],
        "unknown_feature": [with_instruction(features=["Dialogue", "Romance"])],
    }
    data_dir = tmp_path / "data"
    mixed = good[:2] + [r for records in bad.values() for r in records] + good[2:]
    random.Random(0).shuffle(mixed)
    write_shards(data_dir, [good, mixed])
    os.link(demo_data / "tok384.model", data_dir / "tok384.model")
    assert pid.main(["--vocab_size=384", f"--data_dir={data_dir}", "--workers=2"]) == 0
    out = capsys.readouterr().out
    meta = json.load(open(data_dir / "instruct384" / "meta.json"))
    expected = {reason: len(records) for reason, records in bad.items()}
    assert meta["skipped"] == expected
    assert meta["per_shard"]["data01"]["records"] == len(mixed)
    assert (meta["val_examples"], meta["train_examples"]) == (5, 5)
    assert f"skipped {sum(expected.values())} (" in out and "bad_words 4" in out
    tokens, lengths = load_outputs(data_dir / "instruct384", "data01")
    tok = Tokenizer(str(data_dir / "tok384.model"))
    good_in_order = kept([r for r in mixed if any(r is g for g in good)], template_prompt, tok, 350)
    check_rows(tokens, lengths, good_in_order, template_prompt, tok, 350)

    # --prompt_style=original needs the GPT prompt, not the words
    no_prompt = with_instruction(words="broken")
    del no_prompt["instruction"]["prompt:"]
    write_shards(data_dir, [good, good + [no_prompt]])
    assert pid.main(["--vocab_size=384", f"--data_dir={data_dir}", "--prompt_style=original"]) == 0
    meta = json.load(open(data_dir / "instruct384" / "meta.json"))
    assert meta["skipped"] == {"no_prompt": 1} and meta["examples"] == 10


def test_real_stories_with_synthetic_instructions(shared_data, tmp_path):
    text = open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8").read()
    stories = [s for s in text.split("<|endoftext|>") if s.strip()]
    rng = random.Random(1)
    records = []
    for story in stories:
        words = [rng.choice(demo_corpus.DEMO_VERBS), rng.choice(demo_corpus.DEMO_NOUNS),
                 rng.choice(demo_corpus.DEMO_ADJECTIVES)]
        features = rng.sample(sorted(prompts.FEATURE_PHRASES), rng.randint(0, 2))
        records.append({"story": "\n\n" + story.strip(), "instruction": {
            "prompt:": prompts.gpt_prompt(*words, features), "words": words, "features": features}})
    data_dir = tmp_path / "data"
    write_shards(data_dir, [records[:50], records[50:]])
    given = os.path.join(shared_data, "tok512.model")
    assert pid.main(["--vocab_size=0", f"--tokenizer={given}", f"--data_dir={data_dir}",
                     "--max_seq_len=512", "--workers=2"]) == 0
    tok = Tokenizer(given)
    meta = json.load(open(data_dir / "instruct0" / "meta.json"))
    sizes = [example_size(r, template_prompt, tok) for r in records]
    assert meta["dropped_too_long"] == sum(n > 512 for n in sizes) > 0
    assert meta["examples"] == sum(n <= 512 for n in sizes) > 100
    for stem, shard in (("data00", records[:50]), ("data01", records[50:])):
        tokens, lengths = load_outputs(data_dir / "instruct0", stem)
        check_rows(tokens, lengths, kept(shard, template_prompt, tok, 512), template_prompt, tok, 512)


def test_broken_shard_fails_naming_it_and_leaves_no_meta(demo_data, tmp_path, capsys):
    data_dir = tmp_path / "data"
    write_shards(data_dir, [shard_records(demo_data, "data00")[:3], []])
    with open(data_dir / "TinyStories_all_data" / "data01.json", "w") as f:
        f.write('[{"story": "x", ')
    os.link(demo_data / "tok384.model", data_dir / "tok384.model")
    assert pid.main(["--vocab_size=384", f"--data_dir={data_dir}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: prepare_instruct_data failed on shard data01.json")
    assert not (data_dir / "instruct384" / "meta.json").exists()
    assert not (data_dir / "instruct384" / "data01.tokens.npy").exists()


@pytest.mark.parametrize("argv, fragment", [
    ([], "--vocab_size"),
    (["--vocab_size=512", "--prompt_style=fancy"], "--prompt_style"),
    (["--vocab_size=0"], "--tokenizer"),
    (["--vocab_size=512", "--max_seq_len=2"], "--max_seq_len"),
    (["--vocab_size=512", "--max_seq_len=many"], "many"),
])
def test_cli_misuse_is_one_line_and_exit_2(argv, fragment, capsys):
    assert_refused(run_main(pid.main, capsys, *argv), fragment)


def test_missing_tokenizer_points_to_train_vocab(demo_data, capsys):
    assert pid.main(["--vocab_size=1024", f"--data_dir={demo_data}"]) == 2  # bad input, not a failed step
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_vocab --vocab_size=1024" in err


def test_prompt_builder_is_unchanged():
    assert build_prompt("climb", "ring", "messy", ["dialogue"]) == (
        'Write a story. In the story, try to use the verb "climb", the noun "ring" and the adjective '
        '"messy". The story has the following features: it should contain a dialogue. Possible story:')
    assert rewrite_original_prompt(prompts.gpt_prompt("hang", "foot", "cute", ["Dialogue"])) == (
        'Write a story. The story should use the verb "hang", the noun "foot" and the adjective "cute". '
        'The story has the following features: the story should contain at least one dialogue. Possible story:')
