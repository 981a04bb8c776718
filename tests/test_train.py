"""train.py: settings parsing, data batches, the training loop, exact resume, DDP, failure paths."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import dataset
import train
from checkpoints import load_checkpoint, load_model
from helpers import (ROOT, VOCAB, free_port, read_metrics, step_losses, tiny_config, write_instruct_shards,
                     write_pretrain_shards)
from model import ModelArgs, Transformer















@pytest.fixture
def pretrain_dir(tmp_path):
    return write_pretrain_shards(str(tmp_path / "data"))


# ---- settings ----------------------------------------------------------------------------------

def test_settings_order_and_types(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 7\nlearning_rate = 1e-3\n_private = 3\nimport math\n")
    c = train.parse_settings([str(cfg), "--learning_rate=2", "--compile=False", "--out_dir=123"])
    assert c["batch_size"] == 7
    assert c["learning_rate"] == 2.0 and isinstance(c["learning_rate"], float)  # an int is a fine float
    assert c["compile"] is False and c["out_dir"] == "123"


@pytest.mark.parametrize("argv, needle", [
    (["--batch_sise=3"], "unknown setting 'batch_sise'"),
    (["--batch_size=abc"], "batch_size expects int"),
    (["--learning_rate=fast"], "learning_rate expects float"),
    (["--compile=1"], "compile expects bool"),
    (["--dataset=books"], "dataset must be one of pretrain, instruct"),
    (["--batch_size"], "expected --key=value"),
    (["nonexistent_config.py"], "no such config file"),
])
def test_bad_settings_are_one_line_errors(argv, needle, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    if "unknown" in needle or "expects" in needle:
        assert "valid" in err and "max_iters" in err  # the valid keys are listed


def test_bad_key_in_config_file_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "bad.py"
    cfg.write_text("batch_size = 4\nlearning_rte = 1e-3\n")
    assert train.main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "learning_rte" in err and len(err.strip().splitlines()) == 1


def test_cli_exit_code_2_without_traceback():
    for args in (["--max_iters=ten"], ["--no_such_key=1"], ["--data_dir=/nonexistent/data", "--max_iters=1"]):
        proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_lr_schedule():
    c = dict(train.DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    lrs = [train.get_lr(i, c) for i in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay, monotone
    assert lrs[55] == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lrs[100] == pytest.approx(0.1)
    assert train.get_lr(60, dict(c, lr_decay_iters=50)) == 0.1
    assert train.get_lr(60, dict(c, decay_lr=False)) == 1.0


# ---- data ---------------------------------------------------------------------------------------

def test_instruct_targets_cover_only_bos_story_eos(tmp_path):
    data_dir = write_instruct_shards(str(tmp_path / "d"))
    folder = os.path.join(data_dir, f"instruct{VOCAB}")
    rows = dataset.InstructRows(folder, [os.path.join(folder, "data01.tokens.npy")], max_len=32)
    tokens = np.load(os.path.join(folder, "data01.tokens.npy"))
    lengths = np.load(os.path.join(folder, "data01.lengths.npy"))
    x, y = rows.get(np.array([0, 5, 9]), "cpu")
    # the batch stops at its longest example's last input: everything after is padding
    assert x.shape[1] == max(lengths[r][1] for r in (0, 5, 9)) - 1 < tokens.shape[1] - 1
    for k, r in enumerate([0, 5, 9]):
        prompt_len, total = lengths[r]
        assert x[k].tolist() == tokens[r, :x.shape[1]].tolist()
        kept = (y[k] != -1).nonzero().flatten().tolist()
        assert kept == list(range(prompt_len - 1, total - 1))  # the first kept target is BOS
        assert y[k, prompt_len - 1] == 1 and y[k, total - 2] == 2


def write_story_rows(shared_data, folder, prompts_and_stories):
    """One instruct shard of real-tokenizer rows, laid out as prepare_instruct_data.py lays them out."""
    from prompts import prompt_ids
    from tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(shared_data, "tok512.model"))
    rows, lengths = [], []
    for prompt, story in prompts_and_stories:
        prompt_part = prompt_ids(tok, prompt, instruct=True)
        rows.append(prompt_part + tok.encode(story) + [tok.eos_id])
        lengths.append((len(prompt_part) - 1, len(rows[-1])))
    width = max(map(len, rows))
    os.makedirs(folder)
    np.save(os.path.join(folder, "data01.tokens.npy"), np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.uint16))
    np.save(os.path.join(folder, "data01.lengths.npy"), np.array(lengths, dtype=np.int32))
    return tok, os.path.join(folder, "data01.tokens.npy")


def test_request_weight_marks_the_story_tokens_that_carry_out_the_prompt(tmp_path, shared_data):
    from prompts import RequestFinder, build_prompt
    story = 'Tim had a ring. A messy dog wanted to climb the tree. "My ring!" said Tim.'
    tok, path = write_story_rows(shared_data, str(tmp_path / "d"), [(build_prompt("climb", "ring", "messy"), story),
                                                                     (build_prompt("climb", "ring", "messy", ["Dialogue"]), story)])
    rows = dataset.InstructRows(str(tmp_path / "d"), [path], max_len=512)
    assert len(rows.get(np.array([0, 1]), "cpu")) == 2  # unweighted rows: (x, y) as before
    rows.emphasize_requests(3.0, RequestFinder(tok))
    x, y, weights = rows.get(np.array([0, 1]), "cpu")
    assert set(weights.unique().tolist()) == {1.0, 3.0} and (y[weights > 1] != -1).all()
    # every story spelling of the three words, in story order, and nothing of the prompt
    assert tok.decode(y[0][weights[0] > 1].tolist()) == "ring messy climb ring"
    # asked for a dialogue: the story's quotation marks too
    quotes = [int(t) for t in y[1] if t >= 0 and '"' in tok.sp.id_to_piece(int(t))]
    assert len(quotes) >= 2
    assert sorted(y[1][weights[1] > 1].tolist()) == sorted(y[0][weights[0] > 1].tolist() + quotes)
    # the loss weighs them three times: the same as the weighted mean computed by hand
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=512, max_seq_len=256))
    logits, loss = model(x, y, target_weights=weights)
    scored = y != -1
    losses = torch.nn.functional.cross_entropy(logits, y[scored], reduction="none")
    assert loss.item() == pytest.approx(((losses * weights[scored]).sum() / weights[scored].sum()).item(), rel=1e-5)
    assert model(x, y)[1].item() == pytest.approx(losses.mean().item(), rel=1e-5)


def test_hero_weight_marks_the_later_spellings_of_the_storys_first_hero_name(tmp_path, shared_data):
    from coherence import hero_name_ids
    from prompts import build_prompt
    story = "There was a girl named Lily. Lily saw Tim. That night, Mia and Lily slept."
    tok, path = write_story_rows(shared_data, str(tmp_path / "d"), [(build_prompt("climb", "ring", "messy"), story)])
    rows = dataset.InstructRows(str(tmp_path / "d"), [path], max_len=512)
    rows.emphasize_hero(3.0, hero_name_ids(tok))
    x, y, weights = rows.get(np.array([0]), "cpu")
    assert set(weights.unique().tolist()) == {1.0, 3.0}
    # Lily's two later spellings; not her first, not Tim or Mia (other names), nothing of the prompt
    assert tok.decode(y[0][weights[0] > 1].tolist()) == "Lily Lily"


@pytest.mark.parametrize("flag, named", [("--request_weight=3", "request_weight=3.0"),
                                         ("--hero_weight=3", "hero_weight=3.0"),
                                         ("--group_by_length=True", "group_by_length=True")])
def test_instruct_only_settings_need_instruct_data(flag, named, pretrain_dir, tmp_path, capsys):
    c = tiny_config(pretrain_dir, tmp_path / "out")
    argv = [f"--{k}={v}" for k, v in c.items() if k in ("data_dir", "vocab_source", "vocab_size", "out_dir")]
    assert train.main(argv + [flag]) == 2
    err = capsys.readouterr().err
    assert named in err and "dataset=instruct" in err and len(err.strip().splitlines()) == 1


def test_group_by_length_cuts_padding_and_keeps_every_example_equally_likely(tmp_path):
    data_dir = write_instruct_shards(str(tmp_path / "d"), rows=128, width=48)
    folder = os.path.join(data_dir, f"instruct{VOCAB}")
    rows = dataset.InstructRows(folder, [os.path.join(folder, f"data0{i}.tokens.npy") for i in (0, 1)], max_len=64)
    lengths = rows.example_lengths()
    assert len(lengths) == 256 and lengths.min() < lengths.max() - 20

    widths = {}
    for group in (False, True):
        sampler = dataset.BatchSampler(rows, 4, 2, 1, 0, 5, group_by_length=group)
        widths[group] = np.mean([x.shape[1] for _ in range(300) for x, _ in sampler.iteration("cpu")])
    assert widths[True] < widths[False] - 5, widths  # batches cut to their longest row: less padding
    sampler = dataset.BatchSampler(rows, 4, 2, 1, 0, 5, group_by_length=True)
    assert sampler.window == 32
    picked = torch.stack([sampler.similar_lengths() for _ in range(2000)])  # (iterations, world, accum, batch)
    place = np.argsort(np.argsort(lengths, kind="stable"), kind="stable")  # each example's place in length order
    for micro in picked.reshape(-1, 4).numpy():
        assert len(set(micro.tolist())) == 4  # drawn without replacement
        # from 32 neighbours in length order (wrapping from the longest to the shortest)
        assert any(((place[micro] - start) % 256 < 32).all() for start in place[micro])
    counts = np.bincount(picked.flatten().numpy(), minlength=256)  # 16,000 draws: 62.5 expected per example
    assert counts.min() >= 30 and counts.max() <= 100, (counts.min(), counts.max())
    # the generator's state is still the sampler's whole position (exact resume)
    state = sampler.get_state()
    first = [x.clone() for x, _ in sampler.iteration("cpu")]
    sampler.set_state(state)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, sampler.iteration("cpu")))


def test_pretrain_windows_come_from_the_shards(pretrain_dir):
    folder = os.path.join(pretrain_dir, f"tok{VOCAB}")
    files = [os.path.join(folder, f"data0{i}.bin") for i in (1, 2)]
    windows = dataset.TokenWindows(folder, files, seq_len=16)
    streams = [np.fromfile(f, dtype=np.uint16) for f in files]
    assert len(windows) == sum(len(s) - 16 for s in streams)
    last = len(windows) - 1  # the very last window ends exactly at the end of the last shard
    x, y = windows.get(np.array([0, len(streams[0]) - 16, last]), "cpu")
    assert x[0].tolist() == streams[0][:16].tolist() and y[0].tolist() == streams[0][1:17].tolist()
    assert x[1].tolist() == streams[1][:16].tolist()
    assert y[2].tolist() == streams[1][-16:].tolist()


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    c = tiny_config(tmp_path / "nodata", tmp_path / "out")
    argv = [f"--{k}={v}" for k, v in c.items() if k in ("data_dir", "vocab_source", "vocab_size", "out_dir")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "no train shards" in err and len(err.strip().splitlines()) == 1


def test_unfinished_instruct_data_is_refused(tmp_path, capsys):
    """prepare_instruct_data.py writes meta.json last: without it the shards may be half-written."""
    data_dir = write_instruct_shards(str(tmp_path / "d"))
    os.remove(os.path.join(data_dir, f"instruct{VOCAB}", "meta.json"))
    c = tiny_config(data_dir, tmp_path / "out", dataset="instruct")
    argv = [f"--{k}={v}" for k, v in c.items() if k in ("data_dir", "vocab_source", "vocab_size", "out_dir", "dataset")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "no meta.json" in err and len(err.strip().splitlines()) == 1


# ---- training -----------------------------------------------------------------------------------

def test_loss_falls_and_outputs_are_written(pretrain_dir, tmp_path):
    out = tmp_path / "out"
    result = train.train(tiny_config(pretrain_dir, out, max_iters=40, eval_interval=20, learning_rate=1e-2))
    evals = [r for r in read_metrics(out) if r.get("eval")]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals
    steps = [r for r in read_metrics(out) if not r.get("eval")]
    assert len(steps) == 40 and all({"iter", "loss", "lr", "tokens_per_s", "mfu"} <= r.keys() for r in steps)
    assert result["best_val_loss"] == min(r["val_loss"] for r in evals)
    for name in ("last.pt", "best.pt", "ckpt.pt", "loss.png"):
        assert os.path.getsize(out / name) > 0
    model, ckpt = load_model(str(out / "ckpt.pt"))
    assert ckpt.kind == "project" and ckpt.extra["iter_num"] == 40
    assert ckpt.config["dataset"] == "pretrain" and ckpt.config["tokenizer"].endswith("tok64.model")
    assert not any(k.startswith("_orig_mod.") for k in ckpt.state_dict)


def test_instruct_training_lowers_loss(tmp_path):
    data_dir = write_instruct_shards(str(tmp_path / "d"), rows=160)  # more rows than group_by_length's window
    out = tmp_path / "out"
    train.train(tiny_config(data_dir, out, dataset="instruct", max_iters=30, eval_interval=30, learning_rate=1e-2,
                            group_by_length=True))
    evals = [r for r in read_metrics(out) if r.get("eval")]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals
    assert load_checkpoint(str(out / "ckpt.pt")).config["dataset"] == "instruct"


def test_resume_continues_exactly(pretrain_dir, tmp_path):
    """max_iters=N in one run equals N/2, then init_from=resume up to N: at every step."""
    settings = dict(max_iters=12, lr_decay_iters=12, eval_interval=5, dropout=0.1)
    train.train(tiny_config(pretrain_dir, tmp_path / "one", **settings))
    train.train(tiny_config(pretrain_dir, tmp_path / "two", **dict(settings, max_iters=6)))
    train.train(tiny_config(pretrain_dir, tmp_path / "two", **dict(settings, init_from="resume")))
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 13))
    assert one == two  # exactly, dropout included: RNG and loader position travel in last.pt


def test_ctrl_c_saves_and_resume_repeats_the_interrupted_step(pretrain_dir, tmp_path, monkeypatch):
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=100)
    train.train(tiny_config(pretrain_dir, tmp_path / "ref", **settings))
    real_get_lr = train.get_lr

    def interrupt_at_5(it, c):
        if it == 5:
            raise KeyboardInterrupt
        return real_get_lr(it, c)
    monkeypatch.setattr(train, "get_lr", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_config(pretrain_dir, tmp_path / "cut", **settings))
    assert load_checkpoint(str(tmp_path / "cut" / "last.pt")).extra["iter_num"] == 5
    monkeypatch.setattr(train, "get_lr", real_get_lr)
    train.train(tiny_config(pretrain_dir, tmp_path / "cut", **dict(settings, init_from="resume")))
    assert step_losses(tmp_path / "ref") == step_losses(tmp_path / "cut")


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(pretrain_dir, tmp_path, capsys):
    out = tmp_path / "out"
    c = tiny_config(pretrain_dir, out, max_iters=50, eval_interval=100, learning_rate=1e30,
                    warmup_iters=0, grad_clip=0.0)
    assert train.main([f"--{k}={v}" for k, v in c.items()]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # above it: the progress bar
    assert message.startswith("error: loss is nan at iter ") or message.startswith("error: loss is inf at iter "), message
    bad_iter = int(message.split("at iter ")[1].split(":")[0])
    steps = step_losses(out)
    assert 0 < bad_iter < 50 and sorted(steps) == list(range(1, bad_iter + 1))  # stopped right there
    ckpt = load_checkpoint(str(out / "last.pt"))  # the last good one: from the evaluation at iter 0
    assert ckpt.extra["iter_num"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())


def test_nan_evaluation_loss_stops_too(pretrain_dir, tmp_path, capsys):
    c = tiny_config(pretrain_dir, tmp_path / "out", max_iters=50, eval_interval=1, learning_rate=1e30,
                    warmup_iters=0, grad_clip=0.0)
    assert train.main([f"--{k}={v}" for k, v in c.items()]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at iter" in message or "loss is inf at iter" in message, message
    ckpt = load_checkpoint(str(tmp_path / "out" / "last.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())


def test_init_from_checkpoint_continues_its_weights(pretrain_dir, tmp_path):
    train.train(tiny_config(pretrain_dir, tmp_path / "a", max_iters=20))
    first = [r for r in read_metrics(tmp_path / "a") if r.get("eval")][-1]
    # a different shape in the settings: the checkpoint's shape wins
    train.train(tiny_config(pretrain_dir, tmp_path / "b", max_iters=0, dim=48,
                            init_from=str(tmp_path / "a" / "ckpt.pt")))
    again = read_metrics(tmp_path / "b")[0]
    assert again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)


def test_bfloat16_autocast_trains(pretrain_dir, tmp_path):
    if not cli.bf16_supported():
        pytest.skip("no bfloat16 support on this CPU")
    train.train(tiny_config(pretrain_dir, tmp_path / "o", dtype="bfloat16", max_iters=20, learning_rate=1e-2))
    evals = [r for r in read_metrics(tmp_path / "o") if r.get("eval")]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0




def test_ddp_two_gloo_processes_match_one_process(pretrain_dir, tmp_path):
    """Same global batch (batch_size x gradient_accumulation_steps, split over the processes)."""
    settings = dict(max_iters=6, eval_interval=100, batch_size=4, gradient_accumulation_steps=4)  # 2 micro-steps a process: no_sync used
    train.train(tiny_config(pretrain_dir, tmp_path / "single", **settings))
    c = tiny_config(pretrain_dir, tmp_path / "ddp", **settings)
    argv = [f"--{k}={v}" for k, v in c.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single, ddp = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert sorted(ddp) == list(range(1, 7))
    for it in single:
        assert ddp[it] == pytest.approx(single[it], rel=1e-4, abs=1e-5), (it, single, ddp)
    a, b = load_checkpoint(str(tmp_path / "single" / "last.pt")), load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_config_file_parses(name):
    import finetune_lora
    path = os.path.join(ROOT, "configs", name)
    with open(path) as f:
        assert f.readline().startswith("#")  # states its hardware and time
    defaults = finetune_lora.DEFAULTS if "lora" in name else train.DEFAULTS
    c = train.parse_settings([path], defaults)
    train.check_values(dict(c, device="cpu", dtype="float32"))
