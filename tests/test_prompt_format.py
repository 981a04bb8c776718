"""The prompt format (prompts.prompt_format) travels with an instruct model into every export and
back: the loader reads it from each format, so an exported model is prompted as it was trained."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import export
import generate
import prompts
from checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from decoding import Decoder
from tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["--verb=climb", "--noun=ring", "--adjective=messy", "--features=dialogue"]
STORY_WORDS = {"is_instruct": True, "prompt_encoding": "story_words"}  # prompts.prompt_format's record
PLAIN_TEXT = {"is_instruct": True, "prompt_encoding": "plain"}
NOT_INSTRUCT = {"is_instruct": False, "prompt_encoding": None}
EXPORTS = [("llama2c-v0", "model.bin"), ("llama2c-v1", "model_v1.bin"), ("llama2c-q8", "model_q8.bin"),
           ("hf", "hf_model"), ("gguf", "model.gguf")]


@pytest.fixture
def record_prompts(monkeypatch):
    """Keep every prompt batch generate.py hands to Decoder.generate."""
    seen = []
    real = Decoder.generate

    def recording(self, prompt, *args, **kwargs):
        seen.append(prompt.tolist())
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Decoder, "generate", recording)
    return seen


@pytest.fixture
def instruct_pt(shared_data, tmp_path):
    """stories260K saved as an instruct model the way a checkpoint from before the record says so
    (dataset "instruct", prompt_encoding story_words): old checkpoints keep their meaning."""
    obj = torch.load(os.path.join(shared_data, "stories260K.pt"), weights_only=True)
    obj["config"] = {**(obj.get("config") or {}), "dataset": "instruct", "prompt_encoding": "story_words",
                     "tokenizer": os.path.join(shared_data, "tok512.model")}
    path = str(tmp_path / "instruct.pt")
    save_checkpoint(path, obj)
    return path


def greedy_story(capsys, record_prompts, model_path, *extra):
    record_prompts.clear()
    capsys.readouterr()
    assert generate.main([f"--model_path={model_path}", "--device=cpu", "--temperature=0",
                          "--max_new_tokens=60", *WORDS, *extra]) == 0
    return record_prompts[0], capsys.readouterr().out


def test_old_checkpoint_keeps_its_meaning(instruct_pt):
    assert load_checkpoint(instruct_pt).prompt_format == STORY_WORDS


@pytest.mark.parametrize("fmt, name", EXPORTS)
def test_exported_instruct_model_samples_the_same_greedy_story(instruct_pt, shared_data, tmp_path, capsys,
                                                               record_prompts, fmt, name):
    tokenizer = os.path.join(shared_data, "tok512.model")
    expected_ids, expected_story = greedy_story(capsys, record_prompts, instruct_pt)
    out = str(tmp_path / name)
    assert export.main([f"--checkpoint={instruct_pt}", f"--format={fmt}", f"--out={out}"]) == 0
    ids, story = greedy_story(capsys, record_prompts, out, f"--tokenizer={tokenizer}")
    assert ids == expected_ids  # the prompt's tokens, then BOS: laid out and encoded as in training
    if fmt != "llama2c-q8":  # Q8_0 weights are not the same numbers, so neither need the story be
        assert story == expected_story and "Write a story" not in story
    assert load_checkpoint(out).prompt_format == STORY_WORDS
    # and back to this project's checkpoint: the record survives the round trip
    back = str(tmp_path / "back.pt")
    assert export.main([f"--checkpoint={out}", "--format=pt", f"--out={back}", f"--tokenizer={tokenizer}"]) == 0
    assert load_checkpoint(back).config["prompt_format"] == STORY_WORDS
    assert greedy_story(capsys, record_prompts, back)[0] == expected_ids


def test_a_file_made_elsewhere_takes_the_format_from_the_flags(instruct_pt, shared_data, tmp_path, capsys,
                                                               record_prompts):
    """A llama2.c .bin without the JSON beside it reads as a plain model; --instruct and
    --prompt_encoding say how it was trained."""
    expected_ids, expected_story = greedy_story(capsys, record_prompts, instruct_pt)
    out = str(tmp_path / "model.bin")
    assert export.main([f"--checkpoint={instruct_pt}", "--format=llama2c-v0", f"--out={out}"]) == 0
    os.remove(out + ".json")
    tokenizer = f"--tokenizer={os.path.join(shared_data, 'tok512.model')}"
    assert load_checkpoint(out).prompt_format == NOT_INSTRUCT
    assert greedy_story(capsys, record_prompts, out, tokenizer, "--prompt_encoding=story_words") == \
        (expected_ids, expected_story)
    plain_ids, _ = greedy_story(capsys, record_prompts, out, tokenizer, "--instruct", "--prompt_encoding=plain")
    assert plain_ids != expected_ids and plain_ids[0][-1] == 1  # plain text, then BOS
    assert generate.main([f"--model_path={out}", tokenizer, "--no-instruct", "--prompt_encoding=plain", *WORDS]) == 2


def test_a_bad_record_beside_a_bin_is_refused_naming_the_file(instruct_pt, tmp_path):
    out = str(tmp_path / "model.bin")
    assert export.main([f"--checkpoint={instruct_pt}", "--format=llama2c-v0", f"--out={out}"]) == 0
    with open(out + ".json", "w") as f:
        json.dump({"prompt_format": {"is_instruct": True, "prompt_encoding": "odd"}}, f)
    with pytest.raises(CheckpointError, match="model.bin.json"):
        load_checkpoint(out).prompt_format


def test_compare_asks_every_model_the_same_tokens():
    """--compare: a base model and its instruct fine-tune get the same prompt ids."""
    base, tuned = NOT_INSTRUCT, STORY_WORDS
    assert evaluate.evaluation_prompt_format([base, tuned]) == tuned
    assert evaluate.evaluation_prompt_format([base]) == PLAIN_TEXT
    with pytest.raises(evaluate.UsageError, match="--prompt_encoding"):
        evaluate.evaluation_prompt_format([tuned, PLAIN_TEXT])
    assert evaluate.evaluation_prompt_format([tuned, PLAIN_TEXT], encoding="plain") == \
        PLAIN_TEXT


# ---- the chat template: other tools lay a request out as training did -------------------------

def render_chat_template(template, text):
    """Render a chat template as llama-cpp-python's Jinja2ChatFormatter and transformers do
    (jinja2, trim_blocks and lstrip_blocks), a system message before the user's."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": text}]
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>",
                                            add_generation_prompt=True)


@given(st.text(alphabet='" \t\nab"é', max_size=30))
@settings(max_examples=300, deadline=None)
def test_chat_template_spells_quotes_as_prompt_ids_does(text):
    """The Jinja walk over the quotes agrees with story_spelled_quotes' regular expression on any
    text, empty words, unclosed quotes and quotes before spaces included."""
    assert render_chat_template(prompts.CHAT_TEMPLATES["story_words"], text) == \
        prompts.story_spelled_quotes(text) + "<s>"
    assert render_chat_template(prompts.CHAT_TEMPLATES["plain"], text) == text + "<s>"


def readme_request():
    return prompts.build_prompt("climb", "ring", "messy", ["dialogue"])


def test_hf_export_apply_chat_template_gives_the_training_ids(instruct_pt, shared_data, tmp_path):
    from transformers import AutoTokenizer

    out = str(tmp_path / "hf_model")
    assert export.main([f"--checkpoint={instruct_pt}", "--format=hf", f"--out={out}"]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": readme_request()}],
                                           add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    assert list(ids) == prompts.prompt_ids(tokenizer, readme_request(), instruct=True)


def test_gguf_export_chat_template_gives_the_training_ids(instruct_pt, shared_data, tmp_path):
    """The GGUF's template rendered as llama.cpp does; its output tokenized as llama.cpp does
    with special tokens parsed: the text before "<s>" with the space prefix, then BOS, and no
    BOS in front (tokenizer.ggml.add_bos_token false)."""
    from gguf import GGUFReader

    out = str(tmp_path / "model.gguf")
    assert export.main([f"--checkpoint={instruct_pt}", "--format=gguf", f"--out={out}"]) == 0
    fields = {name: field.contents() for name, field in GGUFReader(out).fields.items()}
    assert fields["tokenizer.ggml.add_bos_token"] is False
    rendered = render_chat_template(fields["tokenizer.chat_template"], readme_request())
    text, bos, rest = rendered.partition("<s>")
    tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    assert bos and not rest
    assert tokenizer.encode(text) + [tokenizer.bos_id] == \
        prompts.prompt_ids(tokenizer, readme_request(), instruct=True)


def test_a_plain_model_exports_no_chat_template(shared_data, tmp_path):
    from gguf import GGUFReader

    out = str(tmp_path / "model.gguf")
    assert export.main([f"--checkpoint={shared_data}/stories260K.pt", "--format=gguf", f"--out={out}"]) == 0
    fields = {name: field.contents() for name, field in GGUFReader(out).fields.items()}
    assert "tokenizer.chat_template" not in fields and fields["tokenizer.ggml.add_bos_token"] is True


def test_a_gguf_file_samples_with_its_own_vocabulary(instruct_pt, shared_data, tmp_path, capsys, record_prompts):
    """No --tokenizer and no .model beside it: the GGUF's vocabulary (with tok512's squeezing of
    spaces, which GGUF has no field for) tokenizes and decodes as tok512.model does."""
    expected_ids, expected_story = greedy_story(capsys, record_prompts, instruct_pt)
    out = tmp_path / "alone" / "model.gguf"
    out.parent.mkdir()
    assert export.main([f"--checkpoint={instruct_pt}", "--format=gguf", f"--out={out}"]) == 0
    assert greedy_story(capsys, record_prompts, str(out)) == (expected_ids, expected_story)
    from checkpoints import load_tokenizer_for
    ours = load_tokenizer_for(load_checkpoint(str(out)))
    reference = Tokenizer(os.path.join(shared_data, "tok512.model"))
    text = open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8").read()[:20000]
    for sample in (text, "a  b ", " Lily  said\n\n  hello ", "é漢 123", "<s> hi </s>"):
        assert ours.encode(sample) == reference.encode(sample), sample
        assert ours.decode(reference.encode(sample)) == reference.decode(reference.encode(sample))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (reference.bos_id, reference.eos_id, reference.vocab_size)
    # and on to the other formats, which need the .model file the GGUF does not hold
    assert export.main([f"--checkpoint={out}", "--format=hf", f"--out={tmp_path / 'hf'}"]) == 0
    assert Tokenizer(str(tmp_path / "hf" / "tokenizer.model")).encode(text) == reference.encode(text)
