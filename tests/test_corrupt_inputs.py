"""Corrupt inputs of every kind refused in one line naming the file (a hypothesis fuzzer over
mutated checkpoints, token shards, instruct arrays and tokenizers; tests/test_faults.py covers
crashes and interrupted runs). The figures these tests print
(run with -s) are the ones docs/reliability.md quotes."""
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataset
from checkpoints import CheckpointError, load_checkpoint, model_args_dict, save_checkpoint
from checkpoints import huggingface, llama2c
from cli import UsageError
from helpers import VOCAB, assert_refused, write_tiny_tokenizer
from lora import apply_lora, lora_state_dict
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, TokenizerError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])




# ---- SIGKILL at 20 points of a run ---------------------------------------------------------------

def tiny_state(seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=8, max_seq_len=16)
    return args, Transformer(args).state_dict()


def write_every_format(folder):
    """{format: (path, the state dict it must load as)} for each kind of file load_checkpoint reads."""
    os.makedirs(folder, exist_ok=True)
    args, state = tiny_state()
    files = {}
    files["project.pt"] = os.path.join(folder, "project.pt")
    save_checkpoint(files["project.pt"], {"kind": "project", "model": state, "model_args": model_args_dict(args),
                                          "config": {"dataset": "instruct"}, "iter_num": 3})
    files["legacy_pickle.pt"] = os.path.join(folder, "legacy_pickle.pt")
    torch.save({"model": state, "model_args": model_args_dict(args)}, files["legacy_pickle.pt"],
               _use_new_zipfile_serialization=False)
    adapted = Transformer(args)
    adapted.load_state_dict(state)
    apply_lora(adapted, ["wq", "wv"], rank=2, alpha=2.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.fill_(0.01)
    files["adapter.pt"] = os.path.join(folder, "adapter.pt")
    save_checkpoint(files["adapter.pt"], {"kind": "lora_adapter", "lora": lora_state_dict(adapted), "lora_alpha": 2.0,
                                          "base_checkpoint": files["project.pt"], "config": {}})
    parametrized = {}
    for key, value in state.items():
        if key.endswith("attention.wq.weight"):
            prefix = key.removesuffix(".weight")
            parametrized[f"{prefix}.parametrizations.weight.original"] = value
            parametrized[f"{prefix}.parametrizations.weight.0.lora_a"] = torch.full((2, value.shape[1]), 0.01)
            parametrized[f"{prefix}.parametrizations.weight.0.lora_b"] = torch.full((value.shape[0], 2), 0.02)
        else:
            parametrized[key] = value
    files["storyteller.pt"] = os.path.join(folder, "storyteller.pt")
    torch.save({"model": parametrized, "model_args": model_args_dict(args), "lora_alpha": 1.0}, files["storyteller.pt"])
    for name, write in (("v0.bin", llama2c.write_llama2c_v0), ("v1.bin", llama2c.write_llama2c_v1),
                        ("v2.bin", llama2c.write_llama2c_q8)):
        files[name] = os.path.join(folder, name)
        write(files[name], args, state)
    from safetensors.torch import save_file
    hf = os.path.join(folder, "hf")
    os.makedirs(hf)
    save_file(huggingface.hf_state_dict(args, state), os.path.join(hf, "model.safetensors"))
    with open(os.path.join(hf, "config.json"), "w") as f:
        plain = {"is_instruct": False, "prompt_encoding": None}
        json.dump(huggingface.hf_config(args, SimpleNamespace(bos_id=1, eos_id=2), plain), f)
    files["hf/model.safetensors"] = os.path.join(hf, "model.safetensors")
    return {name: (path, load_checkpoint(path if not name.startswith("hf/") else hf).state_dict)
            for name, path in files.items()}


def mutable_region(name, data):
    """Where a mutation can be told from the original. Zip .pt files: anywhere (this project checks
    the CRC-32 torch.save records for every member). llama2.c's .bin and safetensors carry no
    checksum, so a flipped bit in their float data is another valid model: their headers only
    (the data's size is still checked through truncation and appending). Legacy pickles: none."""
    if name.endswith(".pt") and data[:2] == b"PK":
        return 0, len(data)
    if name == "v0.bin":
        return 0, 28
    if name.endswith(".bin"):
        return 0, 256
    if name.endswith(".safetensors"):
        return 0, 8 + int.from_bytes(data[:8], "little")
    return 0, 0


@st.composite
def mutations(draw, size, region):
    kinds = ["truncate", "append"] + (["flip", "overwrite"] if region[1] > region[0] else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1)), b""
    if kind == "append":
        return kind, size, draw(st.binary(min_size=1, max_size=64))
    at = draw(st.integers(region[0], region[1] - 1))
    if kind == "flip":
        return kind, at, bytes([1 << draw(st.integers(0, 7))])
    return kind, at, draw(st.binary(min_size=1, max_size=16))


def mutate(data, mutation):
    kind, at, payload = mutation
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[:at])
    if kind == "append":
        return bytes(data + payload)
    if kind == "flip":
        data[at] ^= payload[0]
        return bytes(data)
    return bytes(data[:at] + payload + data[at + len(payload):])


FUZZ_COUNTS = {}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    return write_every_format(str(tmp_path_factory.mktemp("formats")))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["project.pt", "legacy_pickle.pt", "adapter.pt", "storyteller.pt",
                                  "v0.bin", "v1.bin", "v2.bin", "hf/model.safetensors"])
def test_corrupt_checkpoints_are_refused_in_one_line_or_load_unchanged(name, originals, tmp_path):
    path, expected = originals[name]
    with open(path, "rb") as f:
        original = f.read()
    outcomes = {"refused": 0, "unchanged": 0}

    @FUZZ
    @given(mutation=mutations(len(original), mutable_region(name, original)))
    def check(mutation):
        target = os.path.join(str(tmp_path), name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if name.startswith("hf/"):
            with open(os.path.join(os.path.dirname(path), "config.json"), "rb") as f:
                config = f.read()
            with open(os.path.join(os.path.dirname(target), "config.json"), "wb") as f:
                f.write(config)
        with open(target, "wb") as f:
            f.write(mutate(original, mutation))
        load_path = os.path.dirname(target) if name.startswith("hf/") else target
        try:
            ckpt = load_checkpoint(load_path)
        except CheckpointError as exc:
            assert_refused(exc, os.path.basename(load_path))
            outcomes["refused"] += 1
            return
        assert set(ckpt.state_dict) == set(expected), mutation  # it loaded: then it is the same model
        for key, value in expected.items():
            assert torch.equal(ckpt.state_dict[key], value), (mutation, key)
        outcomes["unchanged"] += 1
    check()
    FUZZ_COUNTS[name] = outcomes
    assert outcomes["refused"] > 0
    print(f"\n{name}: {sum(outcomes.values())} mutated files, {outcomes['refused']} refused in one line, "
          f"{outcomes['unchanged']} loaded unchanged, 0 tracebacks")


# ---- corrupt data: token shards, instruct arrays, tokenizers -------------------------------------

@pytest.mark.slow
@FUZZ
@given(raw=st.one_of(st.binary(max_size=200),
                     st.lists(st.integers(0, VOCAB + 3), max_size=80).map(lambda ids: np.array(ids, np.uint16).tobytes())))
def test_token_shards_are_refused_in_one_line_unless_valid(raw, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shard"))
    path = os.path.join(folder, "data01.bin")
    with open(path, "wb") as f:
        f.write(raw)
    tokens = np.frombuffer(raw[:len(raw) // 2 * 2], dtype=np.uint16)
    valid = len(raw) % 2 == 0 and len(tokens) > 8 and (tokens < VOCAB).all()
    try:
        windows = dataset.TokenWindows(folder, [path], seq_len=8, vocab_size=VOCAB)
    except UsageError as exc:
        assert_refused(exc, path)
        assert not valid
        FUZZ_COUNTS["token shards"] = FUZZ_COUNTS.get("token shards", 0) + 1
        return
    assert valid
    x, y = windows.get(np.arange(len(windows)), "cpu")
    assert int(x.max()) < VOCAB and int(y.max()) < VOCAB
    FUZZ_COUNTS["token shards"] = FUZZ_COUNTS.get("token shards", 0) + 1


ARRAYS = st.tuples(st.sampled_from([np.uint16, np.int32, np.int64, np.float32, np.uint8, np.bool_]),
                   st.lists(st.integers(0, 6), min_size=1, max_size=3), st.integers(-2, VOCAB + 40))


@pytest.mark.slow
@FUZZ
@given(tokens_spec=ARRAYS, lengths_spec=ARRAYS, header_flip=st.none() | st.tuples(st.integers(0, 127), st.integers(0, 7)))
def test_instruct_shards_are_refused_in_one_line_unless_valid(tokens_spec, lengths_spec, header_flip, tmp_path_factory):
    """Arrays of any dtype, shape and values, and valid files with a bit flipped in the .npy header:
    either refused in one line naming the file, or every row they give is a sane training row."""
    folder = str(tmp_path_factory.mktemp("instruct"))
    rng = np.random.default_rng(len(FUZZ_COUNTS.get("instruct", [])))
    (t_dtype, t_shape, t_high), (l_dtype, l_shape, l_high) = tokens_spec, lengths_spec
    tokens = rng.integers(0, max(1, t_high), size=t_shape).astype(t_dtype)
    lengths = rng.integers(0, max(1, l_high), size=l_shape).astype(l_dtype)
    if header_flip is not None:  # a well-formed shard whose header is damaged
        tokens = rng.integers(3, VOCAB, size=(4, 12)).astype(np.uint16)
        lengths = np.array([[2, 10]] * 4, dtype=np.int32)
    tokens_path, lengths_path = os.path.join(folder, "data01.tokens.npy"), os.path.join(folder, "data01.lengths.npy")
    np.save(tokens_path, tokens)
    np.save(lengths_path, lengths)
    if header_flip is not None:
        with open(tokens_path, "r+b") as f:
            f.seek(header_flip[0])
            byte = f.read(1)
            f.seek(header_flip[0])
            f.write(bytes([byte[0] ^ (1 << header_flip[1])]))
    FUZZ_COUNTS.setdefault("instruct", []).append(1)
    try:
        rows = dataset.InstructRows(folder, [tokens_path], max_len=32, vocab_size=VOCAB)
    except UsageError as exc:
        assert "\n" not in str(exc) and ("data01.tokens.npy" in str(exc) or "data01.lengths.npy" in str(exc)), str(exc)
        return
    if len(rows):
        x, y = rows.get(np.arange(len(rows)), "cpu")
        assert 0 <= int(x.min()) and int(x.max()) < VOCAB
        assert int(y.min()) >= -1 and int(y.max()) < VOCAB


def test_fuzz_counts_are_reported():
    """Runs after the fuzz tests above (pytest keeps file order): the total for docs/reliability.md."""
    checkpoints = sum(sum(v.values()) for k, v in FUZZ_COUNTS.items() if isinstance(v, dict))
    data = FUZZ_COUNTS.get("token shards", 0) + len(FUZZ_COUNTS.get("instruct", []))
    print(f"\nfuzzed: {checkpoints} checkpoint files, {data} data files, 0 tracebacks")




@pytest.mark.slow
def test_files_that_are_no_tokenizer_are_refused_in_one_line(tmp_path):
    model = write_tiny_tokenizer(str(tmp_path))
    with open(model, "rb") as f:
        original = f.read()
    args, state = tiny_state()
    others = {"empty": b"", "text": b"Once upon a time\n" * 20, "npy header": b"\x93NUMPY\x01\x00v\x00",
              "llama2c bin": open(os.path.join(str(tmp_path), "tok.model"), "rb").read()[:3] + b"\x00" * 100}
    torch.save({"model": state}, str(tmp_path / "checkpoint.pt"))
    others["checkpoint"] = (tmp_path / "checkpoint.pt").read_bytes()
    rng = random.Random(5)
    candidates = list(others.values())
    candidates += [original[:rng.randrange(1, len(original))] for _ in range(40)]  # truncated
    candidates += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(20)]  # noise
    refused = 0
    for i, data in enumerate(candidates):
        path = str(tmp_path / f"candidate{i}.model")
        with open(path, "wb") as f:
            f.write(data)
        try:
            tokenizer = Tokenizer(path)
        except TokenizerError as exc:
            assert_refused(exc, path)
            refused += 1
            continue
        tokenizer.decode(tokenizer.encode("the cat ran home"))  # what parses is a working tokenizer
    print(f"\ntokenizers: {len(candidates)} files that are no tokenizer or a damaged one, {refused} refused "
          f"in one line, {len(candidates) - refused} parsed as working tokenizers, 0 tracebacks")
    assert refused >= len(others) - 1
