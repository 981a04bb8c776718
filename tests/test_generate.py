"""generate.py as a user meets it: the command line in a subprocess (output, exit codes, one-line
errors), plus in-process checks of which token ids the model is given."""
import os
import re

import pytest
import torch

import generate
from checkpoints import save_checkpoint
from decoding import Decoder
from helpers import assert_refused, greedy_story, readme_prompt, run_main, run_script
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

BOS = 1
SUMMARY = re.compile(r"generated (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\b")


@pytest.fixture
def tok512(shared_data):
    return os.path.join(shared_data, "tok512.model")


def tiny_checkpoint(path, vocab_size, config=None, max_seq_len=64):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                     multiple_of=8, max_seq_len=max_seq_len)
    save_checkpoint(str(path), {"model": Transformer(args).state_dict(), "model_args": vars(args),
                                "config": config or {}})
    return str(path)


# ---- the real model through the command line ------------------------------------------------

@pytest.mark.parametrize("filename, extra", [("stories260K.pt", []),
                                             ("stories260K.bin", ["--no_kv_cache"])])
def test_cli_greedy_stories260K_prints_the_published_story(shared_data, tok512, filename, extra):
    expected = greedy_story()
    # the .pt finds tok512.model beside itself; the .bin is given it explicitly
    tokenizer = [] if filename.endswith(".pt") else [f"--tokenizer={tok512}"]
    result = run_script("generate.py", f"--model_path={os.path.join(shared_data, filename)}", "--temperature=0",
                     "--max_new_tokens=200", "--device=cpu", *tokenizer, *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    summary = SUMMARY.search(result.stderr)
    assert summary, result.stderr
    assert int(summary.group(1)) == 200
    assert float(summary.group(2)) > 0 and float(summary.group(3)) > 0


def test_cli_num_samples_prints_each_sample(shared_data):
    result = run_script("generate.py", f"--model_path={os.path.join(shared_data, 'stories260K.pt')}", "--num_samples=3",
                     "--temperature=1.0", "--max_new_tokens=40", "--seed=7", "--device=cpu")
    assert result.returncode == 0, result.stderr
    parts = re.split(r"^--- sample (\d+)\n", result.stdout, flags=re.M)
    assert parts[0] == "" and parts[1::2] == ["1", "2", "3"], result.stdout
    stories = [p.strip() for p in parts[2::2]]
    assert all(stories) and len(set(stories)) == 3  # sampled, so they differ
    assert "3 samples" in result.stderr and SUMMARY.search(result.stderr)


# ---- errors: exit code 2 and one line on stderr ---------------------------------------------

class CreatesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cli_refuses_a_hostile_pickle(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": CreatesMarker(marker)}, path)
    result = run_script("generate.py", f"--model_path={path}", "--device=cpu")
    assert_refused(result, path, stdout_empty=True)
    assert not marker.exists()


def test_cli_process_exit_codes_for_a_bad_flag_and_a_missing_checkpoint(tmp_path):
    assert_refused(run_script("generate.py", "--model_path=x.pt", "--no_such_flag=1"), "--no_such_flag", stdout_empty=True)
    assert_refused(run_script("generate.py", f"--model_path={tmp_path / 'missing.pt'}", "--device=cpu"),
                       tmp_path / "missing.pt", stdout_empty=True)


def test_usage_errors(shared_data, tok512, tmp_path, capsys):
    model = os.path.join(shared_data, "stories260K.pt")
    vocab300 = tiny_checkpoint(tmp_path / "vocab300.pt", 300)
    long_prompt = "Once upon a time there was a little girl. " * 80  # far beyond 512 tokens
    assert len(Tokenizer(tok512).encode(long_prompt)) > 600
    evil = tmp_path / "evil.bin"
    marker = tmp_path / "marker"
    torch.save({"model": {}, "model_args": CreatesMarker(marker)}, evil)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = [
        (["--model_path", model, "--no_such_flag=1"], ["--no_such_flag"]),
        (["--prompt=hi"], ["--model_path"]),                     # the required flag missing
        (["--model_path", model, "--temperature=warm"], ["--temperature"]),
        (["--model_path", model, "--temperature=-0.5"], ["--temperature"]),
        (["--model_path", model, "--top_k=0"], ["--top_k"]),
        (["--model_path", model, "--top_p=0"], ["--top_p"]),
        (["--model_path", model, "--top_p=1.5"], ["--top_p"]),
        (["--model_path", model, "--max_new_tokens=0"], ["--max_new_tokens"]),
        (["--model_path", model, "--verb=climb"], ["--noun"]),  # the words go together
        (["--model_path", model, "--verb=a", "--noun=b", "--adjective=c", "--features=rhymes"],
         ["rhymes"]),
        (["--model_path", model, "--prompt", long_prompt], ["prompt", "512"]),
        (["--model_path", vocab300, f"--tokenizer={tok512}"], [vocab300, "300", "512"]),
        (["--model_path", model, f"--tokenizer={tmp_path / 'none.model'}"], [tmp_path / "none.model"]),
        (["--model_path", str(tmp_path / "missing.pt")], [tmp_path / "missing.pt"]),
        (["--model_path", empty], [empty]),
        (["--model_path", evil], [evil]),
        (["--model_path", model, "--device=banana"], ["--device"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model_path", model, "--device=cuda"], ["--device", "cpu"]))
    for args, mentions in cases:
        extra = [] if any(a.startswith("--device") for a in map(str, args)) else ["--device=cpu"]
        assert_refused(run_main(generate.main, capsys, *args, *extra), *mentions, stdout_empty=True)
    assert not marker.exists()


# ---- which ids the model is given -----------------------------------------------------------

@pytest.fixture
def record_prompts(monkeypatch):
    """Run generate.main in-process and keep the prompt batch handed to Decoder.generate."""
    seen = []
    real = Decoder.generate

    def recording(self, prompt, max_new_tokens, *args, **kwargs):
        seen.append(prompt.tolist())
        return real(self, prompt, min(max_new_tokens, 3), *args, **kwargs)

    monkeypatch.setattr(Decoder, "generate", recording)
    return seen


def test_instruction_flags_build_the_readme_prompt(shared_data, tok512, record_prompts, capsys):
    words = dict(verb="climb", noun="ring", adjective="messy")
    expected_text = readme_prompt(*words.values())
    flags = [f"--{k}={v}" for k, v in words.items()] + ["--features=dialogue"]
    args = generate.build_parser().parse_args(["--model_path=x"] + flags)
    assert generate.prompt_text(args) == expected_text

    seed = os.path.join(shared_data, "seed_format_lora260K.pt")
    assert generate.main([f"--model_path={seed}", "--device=cpu", "--temperature=0"] + flags) == 0
    # an instruct model read the prompt, then BOS opened the story
    assert record_prompts == [[Tokenizer(tok512).encode(expected_text) + [BOS]]]
    assert "Write a story" not in capsys.readouterr().out  # the prompt is not part of the story


@pytest.mark.parametrize("encoding", ["story_words", "plain", None])
def test_an_instruct_prompt_is_encoded_as_the_models_data_was(tok512, tmp_path, record_prompts, encoding):
    """The checkpoint records how its instruct data tokenized prompts; generation follows it.
    story_words: each quoted word after a space, as a story spells it; plain (and checkpoints
    from before the record): the text as it is."""
    config = {"dataset": "instruct", **({"prompt_encoding": encoding} if encoding else {})}
    path = tiny_checkpoint(tmp_path / "ckpt.pt", 512, config=config, max_seq_len=160)
    words = ["--verb=climb", "--noun=ring", "--adjective=messy", "--features=dialogue"]
    assert generate.main([f"--model_path={path}", f"--tokenizer={tok512}", "--device=cpu", *words]) == 0
    text = readme_prompt("climb", "ring", "messy")
    if encoding == "story_words":
        text = text.replace('"climb"', '" climb"').replace('"ring"', '" ring"').replace('"messy"', '" messy"')
    assert record_prompts == [[Tokenizer(tok512).encode(text) + [BOS]]]


def test_an_unknown_prompt_encoding_is_refused_in_one_line(tok512, tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "ckpt.pt", 512, config={"dataset": "instruct", "prompt_encoding": "odd"})
    assert generate.main([f"--model_path={path}", f"--tokenizer={tok512}", "--device=cpu", "--prompt=hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ckpt.pt" in err and "prompt_encoding 'odd'" in err, err


@pytest.mark.parametrize("dataset, instruct", [("instruct", True), ("tinystories", False)])
def test_bos_goes_after_an_instruct_prompt_and_before_a_plain_one(tok512, tmp_path, record_prompts,
                                                                  capsys, dataset, instruct):
    path = tiny_checkpoint(tmp_path / "ckpt.pt", 512, config={"dataset": dataset})
    text = "Once upon a time"
    assert generate.main([f"--model_path={path}", f"--tokenizer={tok512}", f"--prompt={text}",
                          "--device=cpu", "--max_new_tokens=3"]) == 0
    ids = Tokenizer(tok512).encode(text)
    assert record_prompts == [[ids + [BOS]] if instruct else [[BOS] + ids]]
    out = capsys.readouterr().out
    assert out.startswith(text) != instruct  # a plain model's output continues the prompt


def test_plain_stories260K_prompt_starts_with_bos(shared_data, tok512, record_prompts, capsys):
    model = os.path.join(shared_data, "stories260K.pt")
    assert generate.main([f"--model_path={model}", "--prompt=Lily saw a cat", "--device=cpu",
                          "--num_samples=2"]) == 0
    ids = [BOS] + Tokenizer(tok512).encode("Lily saw a cat")
    assert record_prompts == [[ids, ids]]
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("Lily saw a cat") == 2


def test_the_default_length_fills_the_context_without_a_note(tmp_path, tok512, capsys):
    """No --max_new_tokens: as many tokens as the model's context leaves after the prompt, and no
    note about capping, which a user asking for nothing in particular has no use for."""
    model = tiny_checkpoint(tmp_path / "tiny.pt", 512, max_seq_len=24)
    result = run_main(generate.main, capsys, f"--model_path={model}", f"--tokenizer={tok512}", "--device=cpu",
                      "--temperature=1.0", "--top_k=500")  # a random model: let it run to the end
    assert result.returncode == 0, result.stderr
    assert "note" not in result.stderr, result.stderr
    # BOS alone is the prompt, so 24 positions leave 24 new tokens unless a stop token came first
    assert 1 <= int(SUMMARY.search(result.stderr).group(1)) <= 24
    assert_refused(run_main(generate.main, capsys, f"--model_path={model}", f"--tokenizer={tok512}",
                            "--max_new_tokens=0"), "--max_new_tokens")


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 0.5)" in text and "(default: 1337)" in text and "(default: 2048" in text
    assert "python generate.py --model_path=out/ckpt.pt" in text  # the docstring's lines as written


def test_a_tiny_temperature_samples_greedily(shared_data, capsys):
    """Dividing logits by 1e-50 overflows float32 and sampled garbage; so small a temperature is greedy."""
    model = f"--model_path={shared_data}/stories260K.pt"
    greedy = run_main(generate.main, capsys, model, "--temperature=0", "--max_new_tokens=40", "--device=cpu")
    tiny = run_main(generate.main, capsys, model, "--temperature=1e-50", "--max_new_tokens=40", "--device=cpu")
    assert greedy.returncode == tiny.returncode == 0
    assert tiny.stdout == greedy.stdout and len(greedy.stdout.split()) > 20
