"""export.py: llama2.c v0/v1/Q8_0 files, Hugging Face folders, GGUF, and imports back."""
import json
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for the Hub here

import export  # noqa: E402
from checkpoints import CheckpointError, load_checkpoint, load_model, model_args_dict, save_checkpoint  # noqa: E402
from checkpoints import gguf_file, huggingface, llama2c  # noqa: E402
from checkpoints.huggingface import hf_permute_qk, hf_unpermute_qk  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from helpers import ROOT, greedy  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


# dim 48 / 6 heads: head_dim 8; hidden 128 so that Q8_0 groups of 16 divide both
GQA = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=320, hidden_dim=128, max_seq_len=64)
MHA = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=320, hidden_dim=96, max_seq_len=64)

WORDS = ("the a cat dog sat ran on under big small red happy sad Lily Tom ball park said hello "
         "played with friend").split()
EDGE_TEXTS = ["a  b", " a ", "   ", "", "x  ", " Lily  said\n\n  hello ", "\t tab", "é漢 123",
              "<s> hi </s>", "the  cat   sat"]


def run_export(*argv):
    return export.main(list(argv))


def architecture(args):
    """The fields that shape the network (multiple_of and dropout are training settings)."""
    return (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size,
            args.max_seq_len, args.norm_eps)


def same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].float(), b[key].float()), key


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 320-piece sentencepiece BPE that, unlike tok512, keeps runs of spaces (as Llama 2's
    tokenizer does), so both normalizer branches of the Hugging Face export are exercised."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,")
             for _ in range(3000)]
    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, allow_whitespace_only_pieces=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   minloglevel=2, num_threads=1)
    return prefix + ".model", lines


def random_checkpoint(folder, shape, tokenizer_path, seed=0):
    """A project checkpoint with random weights, norms included (all-ones norms would hide a
    norm written in the wrong place)."""
    torch.manual_seed(seed)
    args = ModelArgs(**shape)
    model = Transformer(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.mul_(5)  # sharper logits: greedy paths that differ show up
    path = os.path.join(folder, "random.pt")
    save_checkpoint(path, {"kind": "project", "model": model.state_dict(), "model_args": model_args_dict(args),
                           "config": {"tokenizer": tokenizer_path, "vocab_size": args.vocab_size}, "iter_num": 0})
    return path


@pytest.fixture
def gqa_checkpoint(tmp_path, tiny_tokenizer):
    return random_checkpoint(str(tmp_path), GQA, tiny_tokenizer[0])


# ---- llama2.c files --------------------------------------------------------------------------

def test_v0_export_is_byte_identical_to_llama2c(shared_data, tmp_path):
    out = tmp_path / "model.bin"
    assert run_export(f"--checkpoint={shared_data}/stories260K.pt", "--format=llama2c-v0", f"--out={out}") == 0
    with open(out, "rb") as ours, open(os.path.join(shared_data, "stories260K.bin"), "rb") as theirs:
        assert ours.read() == theirs.read()
    with open(tmp_path / "tok512.bin", "rb") as ours, open(os.path.join(shared_data, "tok512.bin"), "rb") as theirs:
        assert ours.read() == theirs.read()


@pytest.mark.parametrize("fmt", ["llama2c-v0", "llama2c-v1"])
def test_llama2c_float_round_trip_stories260K(shared_data, tmp_path, fmt):
    out = tmp_path / "model.bin"
    assert run_export(f"--checkpoint={shared_data}/stories260K.pt", f"--format={fmt}", f"--out={out}") == 0
    source_model, source = load_model(os.path.join(shared_data, "stories260K.pt"))
    back_model, back = load_model(str(out))
    assert back.kind == {"llama2c-v0": "llama2c_bin_v0", "llama2c-v1": "llama2c_bin_v1"}[fmt]
    assert architecture(back.model_args) == architecture(source.model_args)
    same_weights(back.state_dict, source.state_dict)
    assert greedy(back_model, 100)[0].tolist() == greedy(source_model, 100)[0].tolist()


@pytest.mark.parametrize("fmt", ["llama2c-v0", "llama2c-v1"])
def test_llama2c_float_round_trip_gqa(gqa_checkpoint, tmp_path, fmt):
    out = tmp_path / "model.bin"
    assert run_export(f"--checkpoint={gqa_checkpoint}", f"--format={fmt}", f"--out={out}") == 0
    source_model, source = load_model(gqa_checkpoint)
    back_model, back = load_model(str(out))
    assert architecture(back.model_args) == architecture(source.model_args)
    same_weights(back.state_dict, source.state_dict)
    assert greedy(back_model, 40)[0].tolist() == greedy(source_model, 40)[0].tolist()
    assert (tmp_path / "tiny.bin").is_file()  # tokenizer.bin named after tiny.model


def check_q8_file(path, source):
    """Every weight within half a quantization step of the source, norms exact. Returns the
    (max, mean) absolute error over the quantized weights."""
    args = source.model_args
    with open(path, "rb") as f:
        magic, version = struct.unpack("<Ii", f.read(8))
        f.seek(37)
        group_size = struct.unpack("<i", f.read(4))[0]
    assert (magic, version) == (0x616B3432, 2)
    assert args.dim % group_size == 0 and args.hidden_dim % group_size == 0
    assert group_size == 64 or args.dim % (2 * group_size) or args.hidden_dim % (2 * group_size)
    back = load_checkpoint(str(path))
    assert back.kind == "llama2c_bin_v2"
    errors = []
    for key, weight in source.state_dict.items():
        if "norm" in key:
            assert torch.equal(back.state_dict[key], weight), key
            continue
        groups = weight.float().reshape(-1, group_size)
        error = (back.state_dict[key].reshape(-1, group_size) - groups).abs()
        half_step = groups.abs().amax(dim=1, keepdim=True) / 127 / 2
        assert (error <= half_step * (1 + 1e-5) + 1e-12).all(), key
        if key != "output.weight":  # tied: the embedding again, counted once
            errors.append(error.flatten())
    errors = torch.cat(errors)
    return errors.max().item(), errors.mean().item(), group_size


def test_q8_round_trip_stories260K(shared_data, tmp_path):
    out = tmp_path / "model_q8.bin"
    assert run_export(f"--checkpoint={shared_data}/stories260K.pt", "--format=llama2c-q8", f"--out={out}") == 0
    source_model, source = load_model(os.path.join(shared_data, "stories260K.pt"))
    max_error, mean_error, group_size = check_q8_file(out, source)
    back_model, _ = load_model(str(out))
    ours, theirs = greedy(source_model, 100)[0].tolist(), greedy(back_model, 100)[0].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    print(f"\nstories260K Q8_0 (group size {group_size}): max abs error {max_error:.3e}, "
          f"mean {mean_error:.3e}; greedy tokens agree for the first {agree} of 100")
    # check_q8_file already holds every weight to half a step of its own group; these bound the
    # whole: the largest weights are about 1.4, so the worst step is 1.4 / 127 / 2 = 5.5e-3
    assert max_error < 6e-3 and mean_error < 1e-3


def test_q8_round_trip_gqa(gqa_checkpoint, tmp_path):
    out = tmp_path / "model_q8.bin"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-q8", f"--out={out}") == 0
    max_error, _, group_size = check_q8_file(out, load_checkpoint(gqa_checkpoint))
    assert group_size == 16


def test_q8_all_zero_group_stays_zero():
    q, scale = llama2c.quantize_q8_0(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]]), 4)
    assert scale.tolist()[0] == 0 and q[0].tolist() == [0, 0, 0, 0]
    assert q[1].tolist() == [64, -127, 32, 0] and scale[1].item() == pytest.approx(2 / 127)


def test_llama2c_bin_imports_to_project_checkpoint(shared_data, tmp_path):
    out = tmp_path / "stories260K_from_bin.pt"
    assert run_export(f"--checkpoint={shared_data}/stories260K.bin", "--format=pt", f"--out={out}") == 0
    imported = load_checkpoint(str(out))
    assert imported.kind == "project" and imported.extra["iter_num"] == 0
    assert imported.config["tokenizer"] == os.path.abspath(os.path.join(shared_data, "tok512.model"))
    assert imported.config["vocab_source"] == "custom" and imported.config["vocab_size"] == 512
    same_weights(imported.state_dict, load_checkpoint(os.path.join(shared_data, "stories260K.pt")).state_dict)


def test_lora_checkpoint_exports_merged_weights(shared_data, tmp_path):
    lora = os.path.join(shared_data, "seed_format_lora260K.pt")
    out = tmp_path / "lora.bin"
    assert run_export(f"--checkpoint={lora}", "--format=llama2c-v1", f"--out={out}") == 0
    merged = load_checkpoint(lora).state_dict
    base = load_checkpoint(os.path.join(shared_data, "stories260K.pt")).state_dict
    back = load_checkpoint(str(out)).state_dict
    same_weights(back, merged)
    assert not torch.equal(back["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"])


# ---- Hugging Face ----------------------------------------------------------------------------

def test_permutation_helpers_are_inverse_and_move_pairs_to_halves():
    heads, head_dim = 3, 8
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 5)
    permuted = hf_permute_qk(rows, heads)
    # in each head, Meta's pair (2i, 2i+1) becomes rows (i, i + head_dim/2)
    first_head = permuted[:head_dim, 0].tolist()
    assert first_head == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(hf_unpermute_qk(permuted, heads), rows)


def hf_logits_match(folder, checkpoint_path, tokens, gguf_file=None):
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    ours, _ = load_model(checkpoint_path)
    with torch.no_grad():
        difference = (theirs(tokens).logits - ours(tokens, all_logits=True)[0]).abs().max().item()
    return theirs, ours, difference


def test_hf_export_stories260K_loads_in_transformers(shared_data, tmp_path):
    out = tmp_path / "hf"
    source = os.path.join(shared_data, "stories260K.pt")
    assert run_export(f"--checkpoint={source}", "--format=hf", f"--out={out}") == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    tokens = torch.randint(0, 512, (2, 96), generator=torch.Generator().manual_seed(0))
    theirs, ours, difference = hf_logits_match(out, source, tokens)
    assert difference < 1e-4
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()  # tied
    prompt = torch.tensor([[1]])
    hf_tokens = theirs.generate(prompt, max_new_tokens=100, do_sample=False)[0, 1:].tolist()
    assert hf_tokens == greedy(ours, 100)[0].tolist()


def test_hf_tokenizer_encodes_like_sentencepiece_tok512(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert run_export(f"--checkpoint={shared_data}/stories260K.pt", "--format=hf", f"--out={out}") == 0
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = Tokenizer(os.path.join(shared_data, "tok512.model"))
    with open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8") as f:
        stories = f.read().split("<|endoftext|>")
    for text in stories + EDGE_TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), repr(text[:60])
    assert theirs(stories[2])["input_ids"] == ours.encode(stories[2], bos=True)  # BOS added, no EOS
    ids = ours.encode(stories[5])
    assert theirs.decode(ids) == ours.decode(ids)


@pytest.mark.parametrize("shape", [GQA, MHA], ids=["gqa", "mha"])
def test_hf_export_random_configs_match_transformers(tmp_path, tiny_tokenizer, shape):
    transformers = pytest.importorskip("transformers")
    source = random_checkpoint(str(tmp_path), shape, tiny_tokenizer[0], seed=1)
    out = tmp_path / "hf"
    assert run_export(f"--checkpoint={source}", "--format=hf", f"--out={out}") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == shape["n_kv_heads"] and config["tie_word_embeddings"] is True
    tokens = torch.randint(0, shape["vocab_size"], (2, shape["max_seq_len"]), generator=torch.Generator().manual_seed(1))
    _, _, difference = hf_logits_match(out, source, tokens)
    assert difference < 1e-4
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = Tokenizer(tiny_tokenizer[0])
    for text in tiny_tokenizer[1][:300] + EDGE_TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), repr(text)


def test_hf_folder_imports_back(tmp_path, tiny_tokenizer):
    source = random_checkpoint(str(tmp_path), GQA, tiny_tokenizer[0], seed=2)
    out = tmp_path / "hf"
    assert run_export(f"--checkpoint={source}", "--format=hf", f"--out={out}") == 0
    back_model, back = load_model(str(out))
    source_model, source_ckpt = load_model(source)
    assert back.kind == "hf" and architecture(back.model_args) == architecture(source_ckpt.model_args)
    same_weights(back.state_dict, source_ckpt.state_dict)
    tokens = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back_model(tokens, all_logits=True)[0], source_model(tokens, all_logits=True)[0])
    # and into this project's checkpoint layout, ready for fine-tuning
    pt = tmp_path / "from_hf.pt"
    assert run_export(f"--checkpoint={out}", "--format=pt", f"--out={pt}") == 0
    raw = torch.load(pt, weights_only=True)
    assert raw["kind"] == "project" and raw["iter_num"] == 0
    assert architecture(ModelArgs(**raw["model_args"])) == architecture(source_ckpt.model_args)
    assert raw["config"]["vocab_size"] == 320 and raw["config"]["vocab_source"] == "custom"
    assert raw["config"]["tokenizer"] == os.path.abspath(out / "tokenizer.model")
    reloaded = load_checkpoint(str(pt))
    assert reloaded.kind == "project"
    same_weights(reloaded.state_dict, source_ckpt.state_dict)


def save_transformers_llama(folder, safetensors=True, **overrides):
    """A LlamaForCausalLM saved by transformers itself: the Hub's layout, not our exporter's."""
    transformers = pytest.importorskip("transformers")
    settings = dict(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
    settings.update(overrides)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    if not safetensors:
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return model


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_import_folder_saved_by_transformers(tmp_path, safetensors):
    folder = tmp_path / "hub_model"
    theirs = save_transformers_llama(folder, safetensors)
    pt = tmp_path / "imported.pt"
    assert run_export(f"--checkpoint={folder}", "--format=pt", f"--out={pt}") == 0
    ours, ckpt = load_model(str(pt))
    assert (ckpt.model_args.n_heads, ckpt.model_args.n_kv_heads, ckpt.model_args.hidden_dim) == (6, 2, 128)
    tokens = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        difference = (theirs(tokens).logits - ours(tokens, all_logits=True)[0]).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("overrides, reason", [
    (dict(attention_bias=True), "attention biases"),
    (dict(tie_word_embeddings=False), "untied lm_head"),
    (dict(rope_theta=500000.0), "rope_theta 500000"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling"),
])
def test_import_refuses_what_the_model_cannot_represent(tmp_path, capsys, overrides, reason):
    folder = tmp_path / "hub_model"
    save_transformers_llama(folder, **overrides)
    with pytest.raises(CheckpointError, match=reason) as caught:
        load_checkpoint(str(folder))
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)
    assert run_export(f"--checkpoint={folder}", "--format=pt", f"--out={tmp_path / 'x.pt'}") == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


# ---- GGUF ------------------------------------------------------------------------------------

GGUF_KEYS = ["general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
             "llama.feed_forward_length", "llama.rope.dimension_count", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
             "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
             "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.ggml.unknown_token_id"]


def check_gguf_file(path, source, tokenizer):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert set(GGUF_KEYS) <= set(fields)
    args, sp = source.model_args, tokenizer.sp
    expected = {"general.architecture": "llama", "llama.context_length": args.max_seq_len,
                "llama.embedding_length": args.dim, "llama.block_count": args.n_layers,
                "llama.feed_forward_length": args.hidden_dim, "llama.rope.dimension_count": args.head_dim,
                "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
                "llama.rope.freq_base": 10000.0, "llama.vocab_size": args.vocab_size,
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": tokenizer.bos_id,
                "tokenizer.ggml.eos_token_id": tokenizer.eos_id, "tokenizer.ggml.unknown_token_id": sp.unk_id()}
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(args.norm_eps)
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.allclose(fields["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(sp.get_piece_size())])
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.bos_id] == 3 and types[tokenizer.eos_id] == 3 and types[sp.unk_id()] == 2
    assert [types[i] == 6 for i in range(sp.get_piece_size())] == [sp.is_byte(i) for i in range(sp.get_piece_size())]
    # every tensor, by llama.cpp's name, equal to the source; q/k NOT permuted
    tensors = {t.name: t for t in reader.tensors}
    names = gguf_file.gguf_key_map(args.n_layers)
    assert set(tensors) == set(names.values())  # tied: no output.weight
    for ours, theirs in names.items():
        tensor = tensors[theirs]
        weight = source.state_dict[ours]
        assert list(tensor.shape) == list(reversed(weight.shape)), theirs  # ggml lists ne fastest first
        assert np.array_equal(np.asarray(tensor.data).reshape(weight.shape), weight.numpy()), theirs


def test_gguf_tensors_and_metadata_stories260K(shared_data, tmp_path):
    out = tmp_path / "model.gguf"
    assert run_export(f"--checkpoint={shared_data}/stories260K.pt", "--format=gguf", f"--out={out}") == 0
    check_gguf_file(out, load_checkpoint(os.path.join(shared_data, "stories260K.pt")),
                    Tokenizer(os.path.join(shared_data, "tok512.model")))


def test_gguf_tensors_and_metadata_gqa(gqa_checkpoint, tiny_tokenizer, tmp_path):
    out = tmp_path / "model.gguf"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=gguf", f"--out={out}") == 0
    check_gguf_file(out, load_checkpoint(gqa_checkpoint), Tokenizer(tiny_tokenizer[0]))


def test_gguf_loads_in_transformers_stories260K(shared_data, tmp_path):
    """transformers as an independent GGUF consumer: it re-permutes q/k for its own RoPE, so
    equal logits mean the file kept Meta's layout."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "model.gguf"
    source = os.path.join(shared_data, "stories260K.pt")
    assert run_export(f"--checkpoint={source}", "--format=gguf", f"--out={out}") == 0
    tokens = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(4))
    theirs, ours, difference = hf_logits_match(tmp_path, source, tokens, gguf_file="model.gguf")
    assert difference < 1e-4
    hf_tokens = theirs.generate(torch.tensor([[1]]), max_new_tokens=100, do_sample=False)[0, 1:].tolist()
    assert hf_tokens == greedy(ours, 100)[0].tolist()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    sp_tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    with open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8") as f:
        stories = f.read().split("<|endoftext|>")
    for text in stories:
        assert tokenizer.encode(text, add_special_tokens=False) == sp_tokenizer.encode(text)
    assert tokenizer(stories[1])["input_ids"][0] == sp_tokenizer.bos_id


def test_gguf_gqa_loads_in_transformers(gqa_checkpoint, tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "model.gguf"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=gguf", f"--out={out}") == 0
    tokens = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(5))
    _, _, difference = hf_logits_match(tmp_path, gqa_checkpoint, tokens, gguf_file="model.gguf")
    assert difference < 1e-4
    # This tokenizer keeps runs of spaces, as a GGUF reader must assume (GGUF has no field for
    # sentencepiece's whitespace squeezing), so runs of spaces agree too. Two known differences
    # of transformers' GGUF tokenizer are left out: "<s>" typed as text becomes the control
    # token, and text that starts with a space gets no extra "▁" prefix (sentencepiece adds one).
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    ours = Tokenizer(tiny_tokenizer[0])
    for text in tiny_tokenizer[1][:300] + [t for t in EDGE_TEXTS if "<s>" not in t and not t.startswith(" ")]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), repr(text)


# ---- command line ----------------------------------------------------------------------------

def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_refuses_to_overwrite_without_force(gqa_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-v1", f"--out={out}") == 2
    assert "--force" in one_line_error(capsys) and out.read_bytes() == b"precious"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-v1", f"--out={out}", "--force") == 0
    assert load_checkpoint(str(out)).kind == "llama2c_bin_v1"
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temp files left


def test_hf_folder_overwrite_and_force(gqa_checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=hf", f"--out={out}") == 2
    one_line_error(capsys)
    assert os.listdir(out) == ["stale.txt"]
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=hf", f"--out={out}", "--force") == 0
    # --force replaces the export's own files only: the user's file stays
    assert (out / "stale.txt").read_text() == "old" and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["hf", "random.pt"]  # no temporary folder left


def test_failed_hf_export_leaves_nothing(gqa_checkpoint, tmp_path, monkeypatch):
    def broken(folder, *args):
        open(os.path.join(folder, "config.json"), "w").close()
        raise OSError("disk full")
    monkeypatch.setattr(huggingface, "write_hf_folder", broken)
    with pytest.raises(OSError):
        export.export(gqa_checkpoint, "hf", str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["random.pt"]


def test_failed_llama2c_write_keeps_the_old_model_and_its_prompt_format(gqa_checkpoint, tmp_path, monkeypatch):
    """Exporting over an earlier .bin: a write that fails leaves the old .bin and the old sidecar
    (not the old model beside the new model's prompt format)."""
    out = tmp_path / "model.bin"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-v0", f"--out={out}") == 0
    old_model, old_sidecar = out.read_bytes(), (tmp_path / "model.bin.json").read_bytes()
    raw = torch.load(gqa_checkpoint, weights_only=True)
    raw["config"]["dataset"] = "instruct"  # another prompt format: the sidecar would change
    instruct = tmp_path / "instruct.pt"
    torch.save(raw, instruct)

    def disk_full(path, args, state):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("No space left on device")
    monkeypatch.setitem(export.LLAMA2C_WRITERS, "llama2c-v0", disk_full)
    assert run_export(f"--checkpoint={instruct}", "--format=llama2c-v0", f"--out={out}", "--force") == 1
    assert out.read_bytes() == old_model
    assert (tmp_path / "model.bin.json").read_bytes() == old_sidecar
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temp files left


def test_failed_hf_export_into_a_folder_changes_nothing_there(gqa_checkpoint, tmp_path, monkeypatch):
    """What export.py promises for an existing folder: the new files are written aside first, so a
    failed write leaves the old export (and the user's files) as they were."""
    out = tmp_path / "hf"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=hf", f"--out={out}") == 0
    (out / "notes.txt").write_text("mine")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def broken(folder, *args):
        open(os.path.join(folder, "config.json"), "w").close()
        raise OSError("disk full")
    monkeypatch.setattr(huggingface, "write_hf_folder", broken)
    with pytest.raises(OSError):
        export.export(gqa_checkpoint, "hf", str(out), force=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "random.pt"]  # no temporary folder left


def test_different_tokenizer_bin_beside_output_needs_force(gqa_checkpoint, tmp_path, capsys):
    (tmp_path / "tiny.bin").write_bytes(b"someone else's tokenizer")
    out = tmp_path / "model.bin"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-v0", f"--out={out}") == 2
    assert "tiny.bin" in one_line_error(capsys) and not out.exists()
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-v0", f"--out={out}", "--force") == 0
    assert (tmp_path / "tiny.bin").read_bytes() != b"someone else's tokenizer"


def test_bad_format_and_bad_inputs_exit_2_in_one_line(gqa_checkpoint, tmp_path, capsys):
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=onnx", f"--out={tmp_path / 'x'}") == 2
    assert "onnx" in one_line_error(capsys)
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello, this is not a model\n" * 20)
    assert run_export(f"--checkpoint={not_a_checkpoint}", "--format=gguf", f"--out={tmp_path / 'x.gguf'}") == 2
    assert str(not_a_checkpoint) in one_line_error(capsys)
    assert run_export(f"--checkpoint={tmp_path / 'missing.pt'}", "--format=hf", f"--out={tmp_path / 'x'}") == 2
    assert "missing.pt" in one_line_error(capsys)
    assert run_export(f"--checkpoint={tmp_path}", "--format=pt", f"--out={tmp_path / 'x.pt'}") == 2
    assert "folder" in one_line_error(capsys)
    with pytest.raises(SystemExit) as caught:
        run_export(f"--checkpoint={gqa_checkpoint}", "--format=hf")  # no --out
    assert caught.value.code == 2
    one_line_error(capsys)


def test_tokenizer_must_fit_the_vocabulary(gqa_checkpoint, shared_data, tmp_path, capsys):
    tok512 = os.path.join(shared_data, "tok512.model")
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=gguf", f"--out={tmp_path / 'x.gguf'}",
                      f"--tokenizer={tok512}") == 2
    assert "512" in one_line_error(capsys) and not (tmp_path / "x.gguf").exists()


def test_cli_process_exit_code_and_message(tmp_path):
    not_a_checkpoint = tmp_path / "garbage.bin"
    not_a_checkpoint.write_bytes(b"\x01\x02\x03" * 10)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--checkpoint={not_a_checkpoint}",
                             "--format=llama2c-v0", f"--out={tmp_path / 'out.bin'}"],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "garbage.bin" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_missing_a_weight_is_refused_before_writing(gqa_checkpoint, tmp_path, capsys):
    raw = torch.load(gqa_checkpoint, weights_only=True)
    del raw["model"]["layers.1.feed_forward.w2.weight"]
    broken = tmp_path / "broken.pt"
    torch.save(raw, broken)
    assert run_export(f"--checkpoint={broken}", "--format=llama2c-v1", f"--out={tmp_path / 'x.bin'}") == 2
    assert "layers.1.feed_forward.w2.weight" in one_line_error(capsys)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "tiny.bin").exists()


def test_output_folder_is_created(gqa_checkpoint, tmp_path):
    out = tmp_path / "new" / "sub" / "model.bin"
    assert run_export(f"--checkpoint={gqa_checkpoint}", "--format=llama2c-q8", f"--out={out}") == 0
    assert sorted(os.listdir(out.parent)) == ["model.bin", "model.bin.json", "tiny.bin"]


def test_help_fits_one_screen_and_names_every_format(capsys):
    """--help is for choosing a format and the flags; the file layouts live in docs/formats.md."""
    with pytest.raises(SystemExit) as exited:
        export.main(["--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0 and len(text.splitlines()) <= 30
    for fmt in export.FORMATS:
        assert f"\n  {fmt} " in text, fmt
    assert "--force" in text and "default:" in text
