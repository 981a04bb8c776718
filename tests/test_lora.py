"""lora.py and finetune_lora.py: adapters, merging, adapter files, fine-tuning a real model."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import dataset
import finetune_lora
import train
from helpers import (ROOT, VOCAB, assert_refused, read_metrics, run_main, step_losses, tiny_config,
                     write_instruct_shards)
from checkpoints import CheckpointError, load_checkpoint, load_model, model_args_dict, save_checkpoint
from lora import LoRALinear, apply_lora, lora_modules, lora_state_dict, merge_lora, merged_state_dict
from model import ModelArgs, Transformer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                 multiple_of=8, max_seq_len=32))


def randomize_adapters(model, seed=1):
    """Give lora_b non-zero values, so the adapters actually change the model's function."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def save_base(path, model):
    save_checkpoint(str(path), {"kind": "project", "model": model.state_dict(),
                                "model_args": model_args_dict(model.args), "config": {}})
    return str(path)


def lora_config(data_dir, out_dir, base, **overrides):
    c = tiny_config(data_dir, out_dir, dataset="instruct", init_from=base, max_iters=10, eval_interval=5)
    c.update({k: finetune_lora.DEFAULTS[k] for k in ("lora_rank", "lora_alpha", "lora_rslora", "lora_dropout", "lora_targets",
                                                      "lora_b_lr_ratio")})
    c.update(overrides)
    return c


# ---- lora.py ------------------------------------------------------------------------------------

def test_lora_linear_starts_as_its_base_and_keeps_the_weight_name():
    linear = torch.nn.Linear(16, 8, bias=False)
    lora = LoRALinear.from_linear(linear, rank=3, alpha=6.0, dropout=0.0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(lora(x), linear(x), rtol=0, atol=0)  # lora_b starts at zero
    assert set(lora.state_dict()) == {"weight", "lora_a", "lora_b"}
    assert lora.lora_a.shape == (3, 16) and lora.lora_b.shape == (8, 3) and lora.scaling == 2.0
    assert not lora.weight.requires_grad and lora.lora_a.requires_grad and lora.lora_b.requires_grad


def test_apply_lora_honours_rank_alpha_dropout_and_targets():
    model = apply_lora(tiny_model(), targets=["wq", "w2"], rank=3, alpha=1.5, dropout=0.25)
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(adapted) == sorted([f"layers.{i}.attention.wq" for i in range(2)]
                                     + [f"layers.{i}.feed_forward.w2" for i in range(2)])
    for m in adapted.values():
        assert m.rank == 3 and m.scaling == pytest.approx(0.5) and m.dropout.p == 0.25
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in adapted for ab in ("lora_a", "lora_b")}
    # a base state dict loads into the adapted model unchanged
    missing, unexpected = model.load_state_dict(tiny_model(seed=5).state_dict(), strict=False)
    assert unexpected == [] and all(k.endswith(("lora_a", "lora_b")) for k in missing)
    with pytest.raises(ValueError, match="lora targets"):
        apply_lora(tiny_model(), targets=["output"])


def test_only_lora_parameters_change_when_training():
    model = apply_lora(tiny_model(), rank=2, alpha=2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = train.configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, VOCAB, (4, 17))
    for _ in range(3):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert any(k.endswith("lora_b") for k in changed)


def test_merged_model_gives_the_adapter_models_logits():
    model = apply_lora(tiny_model(), targets=["wq", "wk", "wv", "wo", "w1"], rank=4, alpha=2.0).eval()
    randomize_adapters(model)
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        adapted = model(tokens, all_logits=True)[0]
        plain = tiny_model(seed=9).eval()
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain(tokens, all_logits=True)[0], adapted, rtol=1e-5, atol=1e-5)
        assert adapted.sub(tiny_model()(tokens, all_logits=True)[0]).abs().max() > 1e-3  # adapters matter
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert set(model.state_dict()) == set(plain.state_dict())
        torch.testing.assert_close(model(tokens, all_logits=True)[0], adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_rank", "rslora"])
def test_adapted_weight_in_one_matmul_trains_as_the_two_thin_ones(rslora):
    """The merged forward (small layers, lora.merges_in_forward) and the textbook x A^T B^T form give
    the same outputs and the same adapter gradients, embedding and tied classifier included."""
    tokens, targets = torch.randint(0, VOCAB, (2, 20)), torch.randint(0, VOCAB, (2, 20))
    results = []
    for merged in (True, False):
        model = apply_lora(tiny_model(), targets=["wq", "wo", "w2", "tok_embeddings"], rank=4, alpha=2.0, rslora=rslora)
        randomize_adapters(model)
        for _, module in lora_modules(model):
            assert module.merge_in_forward  # tiny layers merge by default
            module.merge_in_forward = merged
        loss = model(tokens, targets)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_merged, grads_merged), (loss_thin, grads_thin) = results
    torch.testing.assert_close(loss_merged, loss_thin, rtol=1e-5, atol=1e-6)
    assert set(grads_merged) == set(grads_thin) and len(grads_merged) == 2 * (2 * 3 + 1)  # A, B of 3 targets x 2 layers + embedding
    for name in grads_thin:
        torch.testing.assert_close(grads_merged[name], grads_thin[name], rtol=1e-4, atol=1e-6)


def test_rslora_scales_by_the_square_root_of_the_rank():
    model = apply_lora(tiny_model(), targets=["wq"], rank=4, alpha=2.0, rslora=True)
    layer = model.layers[0].attention.wq
    assert layer.scaling == 1.0  # 2 / sqrt(4); alpha / rank would be 0.5
    randomize_adapters(model)
    torch.testing.assert_close(layer.merged_weight(), layer.weight + layer.lora_b @ layer.lora_a)


def test_embedding_adapter_moves_embedding_and_tied_classifier_alike(tmp_path):
    """tok_embeddings as a target: one low-rank update serves the embedding and the classifier
    tied to it, in the adapted model, the merged state dict, merge_lora and an adapter file."""
    model = apply_lora(tiny_model(), targets=["wq", "tok_embeddings"], rank=3, alpha=6.0).eval()
    randomize_adapters(model)
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        adapted = model(tokens, all_logits=True)[0]
        state = merged_state_dict(model)
        assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
        assert not torch.equal(state["tok_embeddings.weight"], tiny_model().tok_embeddings.weight)
        plain = tiny_model(seed=9).eval()
        plain.load_state_dict(state)
        torch.testing.assert_close(plain(tokens, all_logits=True)[0], adapted, rtol=1e-5, atol=1e-5)
        base = save_base(tmp_path / "base.pt", tiny_model())
        save_checkpoint(str(tmp_path / "adapter.pt"), {
            "kind": "lora_adapter", "lora": lora_state_dict(model), "lora_alpha": 6.0, "lora_rank": 3,
            "base_checkpoint": base})
        from_file = tiny_model(seed=9).eval()
        from_file.load_state_dict(load_checkpoint(str(tmp_path / "adapter.pt")).state_dict)
        torch.testing.assert_close(from_file(tokens, all_logits=True)[0], adapted, rtol=1e-5, atol=1e-5)
        merge_lora(model)
        assert model.output.weight is model.tok_embeddings.weight
        torch.testing.assert_close(model(tokens, all_logits=True)[0], adapted, rtol=1e-5, atol=1e-5)


# ---- finetune_lora.py ---------------------------------------------------------------------------

@pytest.fixture
def lora_run(tmp_path):
    """A finished fine-tune of a tiny base on synthetic instruct rows."""
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base_model = tiny_model()
    base = save_base(tmp_path / "base.pt", base_model)
    out = tmp_path / "out"
    c = lora_config(data_dir, out, base, learning_rate=1e-2, lora_targets="wq,wv,w3", lora_rank=3, lora_alpha=3.0)
    assert finetune_lora.main([f"--{k}={v}" for k, v in c.items()]) == 0
    return dict(data_dir=data_dir, base=base, base_model=base_model, out=out, config=c)


def test_finetune_saves_a_small_adapter_and_a_merged_checkpoint(lora_run):
    out, base_state = lora_run["out"], lora_run["base_model"].state_dict()
    adapter = load_checkpoint(str(out / "adapter.pt"))
    assert adapter.kind == "lora_adapter"
    assert adapter.extra["lora_rank"] == 3 and adapter.extra["lora_alpha"] == 3.0
    assert adapter.extra["lora_targets"] == ["wq", "wv", "w3"]
    assert os.path.samefile(adapter.extra["base_checkpoint_absolute"], lora_run["base"])
    assert adapter.extra["base_checkpoint"] == os.path.join("..", "base.pt")  # relative: the tree can move
    assert os.path.getsize(out / "adapter.pt") < os.path.getsize(lora_run["base"]) / 2

    merged, ckpt = load_model(str(out / "ckpt.pt"))
    assert ckpt.kind == "project" and ckpt.config["dataset"] == "instruct"
    assert ckpt.config["tokenizer"] == "tok64.model"  # from the instruct folder's meta.json
    assert ckpt.prompt_encoding == "plain"  # its meta.json predates the record: the text as it is
    targeted = (".attention.wq.", ".attention.wv.", ".feed_forward.w3.")
    for key, value in ckpt.state_dict.items():
        if any(t in key for t in targeted):
            assert not torch.equal(value, base_state[key]), key  # the adapters were trained...
        else:
            assert torch.equal(value, base_state[key]), key  # ...and nothing else changed
    # the adapter file, merged by the loader onto its base, is the same model as ckpt.pt
    from_adapter = Transformer(adapter.model_args).eval()
    from_adapter.load_state_dict(adapter.state_dict)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(from_adapter(tokens, all_logits=True)[0], merged(tokens, all_logits=True)[0])


def test_adapter_refuses_a_different_base(lora_run):
    base_path = lora_run["base"]
    state = {k: v.clone() for k, v in lora_run["base_model"].state_dict().items()}
    state["norm.weight"] += 1.0
    save_checkpoint(base_path, {"kind": "project", "model": state, "config": {},
                                "model_args": model_args_dict(lora_run["base_model"].args)})
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(str(lora_run["out"] / "adapter.pt"))


def test_lora_resume_continues_exactly(tmp_path):
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=3, lora_dropout=0.1, learning_rate=1e-2)
    train.train(lora_config(data_dir, tmp_path / "one", base, **settings), finetune_lora.LoRATraining())
    train.train(lora_config(data_dir, tmp_path / "two", base, **dict(settings, max_iters=4)), finetune_lora.LoRATraining())
    train.train(lora_config(data_dir, tmp_path / "two", base, **dict(settings, init_from="resume")),
                finetune_lora.LoRATraining())
    assert step_losses(tmp_path / "one") == step_losses(tmp_path / "two")


def test_lora_auto_resume_after_a_crash_finishes_exactly_and_refuses_other_adapter_settings(tmp_path, monkeypatch,
                                                                                           capsys):
    """One finetune_lora.py command (--init_from=base --auto_resume) for the first start and the
    restart after a crash (no save on the way out, as a lost node): it continues last.pt to the
    uninterrupted run's losses and weights; another lora_alpha is refused in one line, the run's
    files untouched."""
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=3, lora_dropout=0.1, learning_rate=1e-2,
                    auto_resume=True)
    train.train(lora_config(data_dir, tmp_path / "one", base, **settings), finetune_lora.LoRATraining())
    argv = [f"--{k}={v}" for k, v in lora_config(data_dir, tmp_path / "two", base, **settings).items()]
    real_get_lr = train.get_lr

    def crash_at_7(it, c):
        if it == 7:
            raise RuntimeError("the node went away")
        return real_get_lr(it, c)
    monkeypatch.setattr(train, "get_lr", crash_at_7)
    with pytest.raises(RuntimeError):
        finetune_lora.main(argv)
    monkeypatch.setattr(train, "get_lr", real_get_lr)
    assert load_checkpoint(str(tmp_path / "two" / "last.pt")).extra["iter_num"] == 6
    capsys.readouterr()
    assert finetune_lora.main(argv) == 0
    assert "continuing the run in" in capsys.readouterr().out
    assert step_losses(tmp_path / "one") == step_losses(tmp_path / "two")
    one, two = (load_checkpoint(str(tmp_path / name / "last.pt")) for name in ("one", "two"))
    assert all(torch.equal(one.extra["lora_state"][k], two.extra["lora_state"][k]) for k in one.extra["lora_state"])
    before = {name: (tmp_path / "two" / name).read_bytes() for name in ("last.pt", "adapter.pt", "metrics.jsonl")}
    assert_refused(run_main(finetune_lora.main, capsys, *argv, "--lora_alpha=8"), "lora_alpha=4.0 (now 8.0)")
    assert {name: (tmp_path / "two" / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_lora_plus_trains_the_b_matrices_at_their_ratio_of_the_rate(tmp_path, ratio):
    """lora_b_lr_ratio gives every B matrix, and nothing else, its own group at ratio x the schedule's
    rate; at 1 the optimizer keeps the two groups that runs saved before the setting existed."""
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    c = lora_config(data_dir, tmp_path / "out", base, max_iters=3, eval_interval=3, lora_b_lr_ratio=ratio)
    assert finetune_lora.main([f"--{k}={v}" for k, v in c.items()]) == 0
    last = load_checkpoint(str(tmp_path / "out" / "last.pt"))
    groups = last.extra["optimizer"]["param_groups"]
    n_b = sum(k.endswith(".lora_b") for k in last.extra["lora_state"])
    assert n_b > 0
    if ratio == 1.0:
        assert len(groups) == 2 and all("lr_scale" not in g for g in groups)
        assert len(groups[0]["params"]) == 2 * n_b
    else:
        (scaled,) = [g for g in groups if g.get("lr_scale") == ratio]
        assert len(scaled["params"]) == n_b and len(groups[0]["params"]) == n_b  # the A matrices
        assert groups[0]["lr"] > 0 and scaled["lr"] == pytest.approx(ratio * groups[0]["lr"])


def test_the_bases_vocabulary_decides_the_data_folder(tmp_path, capsys):
    """Only --init_from, --data_dir and --vocab_size (as a user of a custom-vocabulary base
    types them): vocab_source comes from the base, so instruct{VOCAB}/ is read, not instruct0/;
    and where the data is missing the error names the folder looked in and the command."""
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    argv = [f"--init_from={base}", f"--data_dir={data_dir}", f"--vocab_size={VOCAB}", f"--out_dir={tmp_path / 'out'}",
            "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=4", "--compile=False",
            "--device=cpu", "--dtype=float32", "--peak_flops=1e12"]
    assert finetune_lora.main(argv) == 0
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt")).config["vocab_source"] == "custom"
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert finetune_lora.main(argv[:1] + [f"--data_dir={empty}"] + argv[2:3] + [f"--out_dir={tmp_path / 'out2'}"]
                              + argv[4:]) == 2
    err = capsys.readouterr().err
    assert f"instruct{VOCAB}" in err and f"prepare_instruct_data.py --vocab_size={VOCAB}" in err, err


@pytest.mark.parametrize("changed", [dict(lora_alpha=8.0), dict(lora_dropout=0.2), dict(lora_rank=4),
                                     dict(lora_b_lr_ratio=4.0)])
def test_lora_resume_refuses_changed_adapter_settings(tmp_path, capsys, changed):
    """A resumed adapter keeps its scale: another alpha (or dropout, rank) is refused in one line."""
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    c = lora_config(data_dir, tmp_path / "out", base, max_iters=2, eval_interval=2)
    assert finetune_lora.main([f"--{k}={v}" for k, v in c.items()]) == 0
    capsys.readouterr()
    again = dict(c, init_from="resume", max_iters=4, **changed)
    assert finetune_lora.main([f"--{k}={v}" for k, v in again.items()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and next(iter(changed)) in err, err


@pytest.mark.parametrize("argv, needle", [
    ([], "needs --init_from=PATH"),
    (["--init_from=/nonexistent/base.pt"], "no such checkpoint file"),
    (["--init_from=x.pt", "--lora_targets=wq,output"], "lora targets"),
    (["--init_from=x.pt", "--lora_rank=0"], "lora_rank=0"),
    (["--lora_rank=two"], "lora_rank expects int"),
    (["--init_from=x.pt", "--lora_b_lr_ratio=0"], "lora_b_lr_ratio=0"),
])
def test_finetune_cli_errors_are_one_line(argv, needle, capsys):
    assert finetune_lora.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


# ---- the real stories260K model -----------------------------------------------------------------

def write_story_instruct_data(shared_data, data_dir, width=513, n_val=32):
    """Instruct rows built with the project's prompt builder from real TinyStories stories."""
    import prompts
    from prompts import build_prompt
    from tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(shared_data, "tok512.model"))
    with open(os.path.join(shared_data, "tinystories_valid_head.txt")) as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    rng = np.random.default_rng(0)
    rows, lengths = [], []
    for story in stories:
        words = [w.strip('.,!?"\'').lower() for w in story.split() if len(w.strip('.,!?"\'')) > 3]
        verb, noun, adjective = rng.choice(words, size=3)
        prompt = build_prompt(verb, noun, adjective, ["Dialogue"] if '"' in story else [])
        prompt_part = prompts.prompt_ids(tok, prompt, instruct=True)  # the prompt, then BOS
        ids = prompt_part + tok.encode(story) + [tok.eos_id]
        if len(ids) <= width:
            rows.append(np.pad(np.array(ids, dtype=np.uint16), (0, width - len(ids))))
            lengths.append((len(prompt_part) - 1, len(ids)))
    folder = os.path.join(data_dir, "instruct512")
    os.makedirs(folder)
    tokens, lengths = np.stack(rows), np.array(lengths, dtype=np.int32)
    for name, part in (("data00", slice(0, n_val)), ("data01", slice(n_val, None))):
        np.save(os.path.join(folder, f"{name}.tokens.npy"), tokens[part])
        np.save(os.path.join(folder, f"{name}.lengths.npy"), lengths[part])
    with open(os.path.join(folder, "meta.json"), "w") as f:  # what a finished prepare_instruct_data leaves
        json.dump({"vocab_size": 512, "max_seq_len": width, "prompt_encoding": "story_words"}, f)
    return len(rows)


def stories260K_config(shared_data, data_dir, out_dir, base, **overrides):
    c = dict(finetune_lora.DEFAULTS, init_from=base, data_dir=str(data_dir), out_dir=str(out_dir),
             lora_rank=2, lora_alpha=1.0, lora_rslora=False, lora_targets="wq,wk,wv,wo",  # the original project's adapters
             tokenizer=os.path.join(shared_data, "tok512.model"), batch_size=8, max_iters=30,
             eval_interval=30, eval_iters=4, warmup_iters=5, learning_rate=1e-2, device="cpu",
             dtype="float32", compile=False, peak_flops=1e12,
             max_seq_len=192)  # rows cropped: all 512 positions would take 4x as long
    c.update(overrides)
    return c


def test_lora_finetune_of_stories260K_lowers_validation_loss(shared_data, tmp_path):
    n_examples = write_story_instruct_data(shared_data, str(tmp_path / "data"))
    assert n_examples > 150
    base = os.path.join(shared_data, "stories260K.pt")
    out = tmp_path / "out"
    train.train(stories260K_config(shared_data, tmp_path / "data", out, base), finetune_lora.LoRATraining())
    evals = [r for r in read_metrics(out) if r.get("eval")]
    assert [r["iter"] for r in evals] == [0, 30]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] - 0.03, evals  # measured: 1.185 -> 1.115
    adapter = load_checkpoint(str(out / "adapter.pt"))
    assert adapter.extra["lora_rank"] == 2 and adapter.extra["lora_targets"] == ["wq", "wk", "wv", "wo"]
    model, ckpt = load_model(str(out / "ckpt.pt"))
    assert ckpt.is_instruct and ckpt.config["tokenizer"].endswith("tok512.model")
    assert ckpt.prompt_encoding == "story_words"  # from meta.json: generation prompts it alike
    base_state = load_checkpoint(base).state_dict
    changed = {k for k in base_state if not torch.equal(base_state[k], ckpt.state_dict[k])}
    assert changed == {f"layers.{i}.attention.{w}.weight" for i in range(5) for w in ("wq", "wk", "wv", "wo")}


@pytest.mark.parametrize("rank, learning_rate", [(2, None), (4, None), (8, None), (16, None), (4, 3e-3), (16, 3e-3)],
                         ids=["r2", "r4", "r8", "r16", "r4-lr3e-3", "r16-lr3e-3"])
def test_lora_defaults_lower_stories260K_validation_loss_at_any_rank(shared_data, tmp_path, rank, learning_rate):
    """finetune_lora's default alpha, scaling, targets and learning rate, on the real model and real
    stories: whatever rank a user picks (and at a 6x higher learning rate, as a user may try),
    60 steps make the model better, not worse."""
    write_story_instruct_data(shared_data, str(tmp_path / "data"))
    defaults = {k: finetune_lora.DEFAULTS[k] for k in ("lora_alpha", "lora_rslora", "lora_targets", "learning_rate")}
    out = tmp_path / "out"
    c = stories260K_config(shared_data, tmp_path / "data", out, os.path.join(shared_data, "stories260K.pt"),
                           **{**defaults, "lora_rank": rank, "max_iters": 60, "eval_interval": 60,
                              **({"learning_rate": learning_rate} if learning_rate else {})})
    train.train(c, finetune_lora.LoRATraining())
    evals = [r["val_loss"] for r in read_metrics(out) if r.get("eval")]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.02, evals


def test_original_projects_lora_checkpoint_is_a_base(shared_data, tmp_path):
    write_story_instruct_data(shared_data, str(tmp_path / "data"))
    base = os.path.join(shared_data, "seed_format_lora260K.pt")
    base_model, _ = load_model(base)  # the loader merges its parametrized LoRA weights
    out = tmp_path / "out"
    train.train(stories260K_config(shared_data, tmp_path / "data", out, base, max_iters=2, eval_interval=100),
                finetune_lora.LoRATraining())
    first_eval = read_metrics(out)[0]
    assert first_eval["iter"] == 0
    # evaluated on the very weights the loader produced: the same loss from the plain model
    c = stories260K_config(shared_data, tmp_path / "data", out, base)
    val = dataset.open_dataset(dict(c, vocab_source="custom", vocab_size=512), "val", 512)
    assert val.seq_len == 192
    losses = []
    with torch.no_grad():
        for rows in dataset.fixed_batches(val, c["eval_iters"], c["batch_size"], c["seed"] + 2):
            losses.append(base_model(*val.get(rows, "cpu"))[1].item())
    assert first_eval["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    adapter = load_checkpoint(str(out / "adapter.pt"))
    assert os.path.samefile(adapter.extra["base_checkpoint_absolute"], base)


# ---- adapters that move, folder bases, targets as lists -----------------------------------------

def test_a_moved_folder_of_base_and_adapter_still_loads(tmp_path):
    """The demo keeps base and adapter in one out/ tree; copied elsewhere (the original gone),
    adapter.pt still finds its base, and resume still runs."""
    tree = tmp_path / "tree"
    tree.mkdir()
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tree / "base.pt", tiny_model())
    c = lora_config(data_dir, tree / "out", base, max_iters=2, eval_interval=2)
    assert finetune_lora.main([f"--{k}={v}" for k, v in c.items()]) == 0
    moved = tmp_path / "moved"
    shutil.move(str(tree), str(moved))
    adapter = load_checkpoint(str(moved / "out" / "adapter.pt"))
    merged = load_checkpoint(str(moved / "out" / "ckpt.pt"))
    assert not os.path.exists(base)  # only the recorded relative path can have found it
    for key, value in merged.state_dict.items():
        torch.testing.assert_close(adapter.state_dict[key], value)
    again = dict(c, out_dir=str(moved / "out"), init_from="resume", max_iters=4)
    assert finetune_lora.main([f"--{k}={v}" for k, v in again.items()]) == 0


def tok64(folder):
    """A sentencepiece model of VOCAB pieces (the tiny models' vocabulary), for the HF export."""
    import sentencepiece as spm
    prefix = str(folder / "tok64")
    lines = ["the cat sat on a mat", "a dog ran to the park", "lily and tom play ball"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2, num_threads=1)
    return prefix + ".model"


def test_a_hugging_face_folder_base_gets_a_content_hash(tmp_path):
    """--init_from=hf_folder/: adapter.pt and resume work, and a changed file in the folder is refused."""
    import export
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    folder = tmp_path / "hf"
    tokenizer = tok64(tmp_path)
    assert export.main([f"--checkpoint={base}", "--format=hf", f"--out={folder}", f"--tokenizer={tokenizer}"]) == 0
    c = lora_config(data_dir, tmp_path / "out", str(folder), max_iters=2, eval_interval=2)
    assert finetune_lora.main([f"--{k}={v}" for k, v in c.items()]) == 0
    adapter = load_checkpoint(str(tmp_path / "out" / "adapter.pt"))
    assert adapter.extra["base_sha256"]
    for key, value in load_checkpoint(str(tmp_path / "out" / "ckpt.pt")).state_dict.items():
        torch.testing.assert_close(adapter.state_dict[key], value)
    again = dict(c, init_from="resume", max_iters=4)
    assert finetune_lora.main([f"--{k}={v}" for k, v in again.items()]) == 0
    with open(folder / "generation_config.json", "a") as f:
        f.write("\n")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(str(tmp_path / "out" / "adapter.pt"))


def test_resume_compares_targets_as_lists(tmp_path):
    data_dir = write_instruct_shards(str(tmp_path / "data"))
    base = save_base(tmp_path / "base.pt", tiny_model())
    c = lora_config(data_dir, tmp_path / "out", base, max_iters=2, eval_interval=2, lora_targets="wq,wk")
    train.train(c, finetune_lora.LoRATraining())
    train.train(dict(c, init_from="resume", max_iters=4, lora_targets="wq, wk"), finetune_lora.LoRATraining())
    assert load_checkpoint(str(tmp_path / "out" / "last.pt")).extra["iter_num"] == 4


def test_the_demo_adapters_train_through_their_merged_weight_at_the_shipped_rank():
    """configs/demo_lora.py's rank 32 steps as fast as rank 8 only because, at the demo's width,
    every adapter trains through W + B A s (docs/finetuning.md, "Rank 32, because at this width the rank is free"). Build the demo's model
    from its two config files and check that every adapter does, and what share it trains."""
    base = train.parse_settings([os.path.join(ROOT, "configs", "demo_base.py")], train.DEFAULTS)
    lora = train.parse_settings([os.path.join(ROOT, "configs", "demo_lora.py")], finetune_lora.DEFAULTS)
    model = Transformer(ModelArgs(dim=base["dim"], n_layers=base["n_layers"], n_heads=base["n_heads"],
                                  n_kv_heads=base["n_kv_heads"], multiple_of=base["multiple_of"],
                                  vocab_size=base["vocab_size"], max_seq_len=base["max_seq_len"]))
    frozen = sum(p.numel() for p in model.parameters())
    apply_lora(model, lora["lora_targets"], lora["lora_rank"], lora["lora_alpha"], lora["lora_dropout"],
               lora["lora_rslora"])
    adapters = dict(lora_modules(model))
    assert len(adapters) == 4 * base["n_layers"] + 1  # wq, wk, wv, wo per layer, and the embedding
    assert all(module.merge_in_forward for module in adapters.values()), sorted(adapters)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rank, dim, vocab = lora["lora_rank"], base["dim"], base["vocab_size"]
    assert trained == rank * (4 * base["n_layers"] * 2 * dim + vocab + dim)
    assert 0.17 < trained / frozen < 0.19  # the 18% that configs/demo_lora.py states
