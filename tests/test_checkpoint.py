"""The checkpoint loader: real llama2.c files, the original instruct storyteller's LoRA format,
hostile and broken files, atomic saving; and the tokenizer's llama2.c export."""
import os
import pickle
import re

import pytest
import torch

from checkpoints import (CheckpointError, base_reference, checkpoint_sha256, load_checkpoint, load_model,
                         model_args_dict, save_checkpoint)
from decoding import generate
from helpers import assert_refused, greedy
from lora import apply_lora, lora_state_dict, merged_state_dict
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

BOS = 1


# ---- real llama2.c files ---------------------------------------------------------------------

def test_stories260K_pt_and_bin_hold_the_same_weights(shared_data):
    pt = load_checkpoint(os.path.join(shared_data, "stories260K.pt"))
    binary = load_checkpoint(os.path.join(shared_data, "stories260K.bin"))
    # the .bin header stores hidden_dim, not multiple_of (nor dropout): compare the shapes
    shape_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")
    assert [getattr(pt.model_args, f) for f in shape_fields] == \
        [getattr(binary.model_args, f) for f in shape_fields]
    assert pt.model_args.n_kv_heads == 4 and pt.model_args.vocab_size == 512
    assert set(pt.state_dict) == set(binary.state_dict)
    for key in pt.state_dict:
        assert torch.equal(pt.state_dict[key], binary.state_dict[key]), key


def test_orig_mod_prefix_from_torch_compile_loads(shared_data, tmp_path):
    raw = torch.load(os.path.join(shared_data, "stories260K.pt"), weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in raw["model"])
    compiled = dict(raw, model={f"_orig_mod.{k}": v for k, v in raw["model"].items()})
    path = tmp_path / "compiled.pt"
    torch.save(compiled, path)
    model, ckpt = load_model(str(path))
    assert set(ckpt.state_dict) == set(raw["model"])
    plain, _ = load_model(os.path.join(shared_data, "stories260K.pt"))
    assert torch.equal(greedy(model, 20), greedy(plain, 20))


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=8,
                     max_seq_len=32)
    model = Transformer(args)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_args": vars(args),
                                "config": {"dataset": "instruct"}, "iter_num": 7})
    loaded, ckpt = load_model(str(path))
    assert ckpt.model_args == args
    assert ckpt.is_instruct
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---- the original instruct storyteller's LoRA checkpoint ------------------------------------

class OriginalModelArgs:
    """This test's own stand-in for the original project's pickled `model.ModelArgs`: the
    unpickler only fills its __dict__ (no code of the file's choosing runs)."""


def read_seed_file_independently(path):
    with torch.serialization.safe_globals([(OriginalModelArgs, "model.ModelArgs")]):
        return torch.load(path, map_location="cpu", weights_only=True)


def merged_by_hand(state, alpha, rank_from_file=None):
    """W + (B @ A) * alpha / rank for every parametrized weight; other keys unchanged."""
    out = {}
    suffix = ".parametrizations.weight.original"
    for key, value in state.items():
        if key.endswith(suffix):
            base = key[:-len(suffix)]
            a = state[base + ".parametrizations.weight.0.lora_a"]
            b = state[base + ".parametrizations.weight.0.lora_b"]
            rank = rank_from_file or a.shape[0]
            out[base + ".weight"] = value + (b @ a) * (alpha / rank)
        elif ".parametrizations." not in key:
            out[key] = value
    return out


@pytest.fixture
def seed_file(shared_data):
    return os.path.join(shared_data, "seed_format_lora260K.pt")


def test_seed_format_file_needs_its_model_args_allow_listed(seed_file):
    # plain weights_only refuses the pickled ModelArgs: the loader must allow-list it, not
    # fall back to trusting the file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(seed_file, weights_only=True)


def test_seed_format_lora_merges_with_the_rank_of_the_tensors(seed_file):
    raw = read_seed_file_independently(seed_file)
    assert raw["lora_rank"] == 2 and float(raw["lora_alpha"]) == 1.0  # what it claims
    a_shapes = {v.shape[0] for k, v in raw["model"].items() if k.endswith("lora_a")}
    assert a_shapes == {4}  # what it is
    targets = {k.split(".parametrizations")[0].rsplit(".", 1)[1] for k in raw["model"] if "lora_a" in k}
    assert targets == {"wq", "wk", "wv", "wo"}

    ckpt = load_checkpoint(seed_file)
    expected = merged_by_hand(raw["model"], alpha=1.0)
    wrong_rank = merged_by_hand(raw["model"], alpha=1.0, rank_from_file=2)
    assert ckpt.is_instruct
    assert ckpt.model_args == ModelArgs(**{k: v for k, v in vars(raw["model_args"]).items()
                                           if k in ModelArgs.__dataclass_fields__})
    assert set(ckpt.state_dict) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ckpt.state_dict[key], value, rtol=0, atol=1e-7)
    wq = "layers.0.attention.wq.weight"
    assert (wrong_rank[wq] - expected[wq]).abs().max() > 1e-3  # rank 2 vs 4 would be visible


def test_seed_format_samples_as_its_merged_weights(seed_file, shared_data):
    raw = read_seed_file_independently(seed_file)
    fields = {k: v for k, v in vars(raw["model_args"]).items() if k in ModelArgs.__dataclass_fields__}
    reference = Transformer(ModelArgs(**fields))
    reference.load_state_dict(merged_by_hand(raw["model"], alpha=float(raw["lora_alpha"])), strict=False)
    reference.eval()
    loaded, _ = load_model(seed_file)
    prompt = torch.full((3, 1), BOS)
    runs = [torch.stack(list(generate(m, prompt, 60, temperature=1.0, top_k=40,
                                        generator=torch.Generator().manual_seed(42))), dim=1)
            for m in (loaded, reference)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(greedy(loaded, 60), greedy(reference, 60))
    # and the adapter changes the model: the base stories260K decodes differently
    base, _ = load_model(os.path.join(shared_data, "stories260K.pt"))
    assert not torch.equal(greedy(base, 60), greedy(loaded, 60))


# ---- hostile and broken files ----------------------------------------------------------------

class CreatesMarker:
    """Unpickling this object calls open(marker, "w"): code execution, if the loader allows it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_files(tmp_path, marker):
    payload = {"model": {"tok_embeddings.weight": torch.zeros(2, 2)}, "model_args": CreatesMarker(marker)}
    zip_path = tmp_path / "evil_zip.pt"
    torch.save(payload, zip_path)
    legacy = tmp_path / "evil_legacy.pt"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    raw = []
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil_pickle{protocol}.bin"
        path.write_bytes(pickle.dumps(payload["model_args"], protocol=protocol))
        raw.append(path)
    return [zip_path, legacy] + raw


def test_hostile_payload_really_runs_code_when_trusted(tmp_path):
    """Control: the files below are dangerous (unpickled without weights_only they act)."""
    marker = tmp_path / "control_marker"
    path = hostile_files(tmp_path, marker)[0]
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    for path in hostile_files(tmp_path, marker):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(str(path))
        assert_refused(info, path)
        assert not marker.exists(), path


def _truncated(src, dst, size):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def test_broken_files_give_a_one_line_error_naming_the_file(shared_data, tmp_path):
    pt = os.path.join(shared_data, "stories260K.pt")
    binary = os.path.join(shared_data, "stories260K.bin")
    broken = [
        _truncated(pt, tmp_path / "half.pt", os.path.getsize(pt) // 2),
        _truncated(pt, tmp_path / "almost.pt", os.path.getsize(pt) - 100),
        _truncated(pt, tmp_path / "head.pt", 10),
        _truncated(binary, tmp_path / "half.bin", os.path.getsize(binary) // 2),
        _truncated(binary, tmp_path / "almost.bin", os.path.getsize(binary) - 4),
        _truncated(binary, tmp_path / "header_only.bin", 28),
        _truncated(binary, tmp_path / "short.bin", 20),
    ]
    text = tmp_path / "notes.pt"
    with open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8") as f:
        text.write_text(f.read(5000), encoding="utf-8")
    short_text = tmp_path / "hello.bin"
    short_text.write_text("hello\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in broken + [text, short_text, empty, tmp_path / "missing.pt", tmp_path]:
        with pytest.raises(CheckpointError) as info:
            load_model(str(path))
        assert_refused(info, path)


# ---- atomic saving ---------------------------------------------------------------------------

def small_checkpoint():
    torch.manual_seed(0)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=20, multiple_of=8, max_seq_len=8)
    return {"model": Transformer(args).state_dict(), "model_args": vars(args)}


def test_save_checkpoint_writes_a_loadable_file_and_nothing_else(tmp_path):
    path = tmp_path / "out" / "ckpt.pt"
    save_checkpoint(str(path), small_checkpoint())
    assert os.listdir(path.parent) == ["ckpt.pt"]
    load_checkpoint(str(path))


def test_failed_save_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # as if the disk filled up halfway through
            handle.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path / "ckpt.pt"), small_checkpoint())
    assert os.listdir(tmp_path) == []


def test_failed_save_from_an_unpicklable_value_leaves_nothing(tmp_path):
    checkpoint = small_checkpoint()
    checkpoint["config"] = {"callback": lambda: None}  # fails after the file was opened
    with pytest.raises(Exception):
        save_checkpoint(str(tmp_path / "ckpt.pt"), checkpoint)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), small_checkpoint())
    before = path.read_bytes()

    def fail(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04partial")
        raise OSError("write failed")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_checkpoint(str(path), small_checkpoint())
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert path.read_bytes() == before


# ---- tokenizer -------------------------------------------------------------------------------

def test_export_of_tok512_model_is_byte_identical_to_tok512_bin(shared_data, tmp_path):
    out = tmp_path / "tok512.bin"
    Tokenizer(os.path.join(shared_data, "tok512.model")).export(str(out))
    with open(os.path.join(shared_data, "tok512.bin"), "rb") as f:
        assert out.read_bytes() == f.read()
    assert os.listdir(tmp_path) == ["tok512.bin"]


def test_tokenizer_round_trip_on_real_stories(shared_data):
    tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (512, 1, 2)
    with open(os.path.join(shared_data, "tinystories_valid_head.txt"), encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    assert len(stories) > 100
    for story in stories:
        ids = tokenizer.encode(story, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 512 for i in ids)
        assert 1 not in ids[1:-1] and 2 not in ids[1:-1]
        assert tokenizer.decode(ids[1:-1]) == story
    # BPE really compresses story text (a byte-level fallback everywhere would not)
    text = "\n".join(stories)
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_weights_that_do_not_fit_model_args_are_refused_by_every_reader(tmp_path):
    """Checked once in the loader, so train.py, finetune_lora.py and export.py all see one line."""
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=4, max_seq_len=8)
    state = Transformer(args).state_dict()
    wrong_shape = dict(state, **{"layers.0.attention.wq.weight": torch.zeros(8, 16)})
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    extra = dict(state, **{"layers.0.attention.bias": torch.zeros(16)})
    for name, weights, fragment in (("shape", wrong_shape, "layers.0.attention.wq.weight is (8, 16)"),
                                    ("missing", missing, "has no weight norm.weight"),
                                    ("extra", extra, "unexpected weights layers.0.attention.bias")):
        path = str(tmp_path / f"{name}.pt")
        torch.save({"model": weights, "model_args": vars(args)}, path)
        with pytest.raises(CheckpointError, match=re.escape(fragment)) as info:
            load_checkpoint(path)
        assert_refused(info, path)


def test_adapter_naming_itself_as_its_base_is_refused(tmp_path):
    path = str(tmp_path / "adapter.pt")
    torch.save({"kind": "lora_adapter", "base_checkpoint": path, "lora": {}, "lora_alpha": 1.0}, path)
    with pytest.raises(CheckpointError, match="names itself") as info:
        load_checkpoint(path)
    assert_refused(info, path)


def test_shipped_test_data_is_what_its_sources_say(shared_data):
    """Every file in tests/data is listed in its SOURCES.md, with the sha256 it has."""
    import hashlib
    import re
    with open(os.path.join(shared_data, "SOURCES.md"), encoding="utf-8") as f:
        sources = f.read()
    sums = dict(re.findall(r"^- (\S+) ([0-9a-f]{64})$", sources, flags=re.M))
    for name in sorted(os.listdir(shared_data)):
        if name == "SOURCES.md":
            continue
        assert f"| {name} |" in sources, name
        if name in sums:
            with open(os.path.join(shared_data, name), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == sums[name], name
    assert {"stories260K.pt", "stories260K.bin", "tok512.model", "tok512.bin"} <= set(sums)


# ---- adapters and the base they name ----------------------------------------------------------

def tiny_base(path, seed):
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=4, max_seq_len=8)
    torch.manual_seed(seed)
    model = Transformer(args)
    save_checkpoint(str(path), {"kind": "project", "model": model.state_dict(), "config": {},
                                "model_args": model_args_dict(args)})
    return model


def save_adapter(path, base_path, base_model):
    """An adapter for base_model (B filled so the merge changes wq), naming base_path as
    finetune_lora.py does: relative and absolute path, and the base's sha256."""
    adapted = Transformer(base_model.args)
    adapted.load_state_dict(base_model.state_dict())
    apply_lora(adapted, ["wq"], rank=2, alpha=2.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.fill_(0.01)
    save_checkpoint(str(path), {"kind": "lora_adapter", "lora": lora_state_dict(adapted), "lora_alpha": 2.0,
                                **base_reference(str(base_path), os.path.dirname(str(path))),
                                "base_sha256": checkpoint_sha256(str(base_path)), "config": {}})
    return merged_state_dict(adapted)


def test_adapter_copied_beside_another_base_finds_its_own_by_the_absolute_path(tmp_path):
    """adapter.pt names base.pt beside it; copied into a folder whose base.pt is another model,
    the relative path names the wrong model, but the recorded absolute path still holds the right one."""
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    base = tiny_base(tmp_path / "run" / "base.pt", seed=1)
    expected = save_adapter(tmp_path / "run" / "adapter.pt", tmp_path / "run" / "base.pt", base)
    tiny_base(tmp_path / "elsewhere" / "base.pt", seed=2)
    copied = tmp_path / "elsewhere" / "adapter.pt"
    copied.write_bytes((tmp_path / "run" / "adapter.pt").read_bytes())
    loaded = load_checkpoint(str(copied))
    for key, value in expected.items():
        torch.testing.assert_close(loaded.state_dict[key], value)


def test_adapter_whose_every_base_changed_is_refused(tmp_path):
    base = tiny_base(tmp_path / "base.pt", seed=1)
    save_adapter(tmp_path / "adapter.pt", tmp_path / "base.pt", base)
    tiny_base(tmp_path / "base.pt", seed=2)
    with pytest.raises(CheckpointError, match="sha256 differs") as info:
        load_checkpoint(str(tmp_path / "adapter.pt"))
    assert_refused(info, tmp_path / "adapter.pt")


def test_a_folder_bases_hash_covers_its_model_files_only(shared_data, tmp_path):
    """A Hugging Face folder used as a LoRA base is pinned by the hash of the files that make the
    model; a .git/ folder or notes added beside them change nothing, a changed config does."""
    import hashlib

    import export
    folder = tmp_path / "hf"
    assert export.main([f"--checkpoint={shared_data}/stories260K.pt", "--format=hf", f"--out={folder}",
                        f"--tokenizer={shared_data}/tok512.model"]) == 0
    pinned = checkpoint_sha256(str(folder))
    # the digest of a folder holding only the export's files is the one adapters saved before recorded
    before = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        before.update(f"{name}\0{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n".encode())
    assert pinned == before.hexdigest()
    base, _ = load_model(str(folder))
    expected = save_adapter(tmp_path / "adapter.pt", folder, base)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "README.md").write_text("my notes\n")
    assert checkpoint_sha256(str(folder)) == pinned
    loaded = load_checkpoint(str(tmp_path / "adapter.pt"))
    for key, value in expected.items():
        torch.testing.assert_close(loaded.state_dict[key], value)
    with open(folder / "config.json", "a") as f:
        f.write("\n")
    assert checkpoint_sha256(str(folder)) != pinned
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(str(tmp_path / "adapter.pt"))
