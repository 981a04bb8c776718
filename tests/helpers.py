"""What the tests share, in one place: paths, running a script as a user runs it, the one-line-error
rule, small models and data, and the published facts the code is checked against.

No test file imports another: what two of them need lives here."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(ROOT, "tests", "data")  # shipped with the repo: see its SOURCES.md
BOS, EOS = 1, 2
VOCAB = 64  # the tiny models' vocabulary, and the tokens written by the data helpers below


# ---- running a script --------------------------------------------------------------------------

def run_script(script, *args, timeout=600, **env):
    """The script in a new interpreter, as a user runs it from the repository root."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def run_main(main, capsys, *args):
    """A script's main() in this process (the code the process runs, minus its start-up):
    a CompletedProcess with the exit code, stdout and stderr the process would give."""
    try:
        code = main(list(map(str, args)))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def message_lines(stderr):
    """stderr without progress bars (tqdm redraws its line with carriage returns)."""
    return [line for line in stderr.splitlines()
            if line.strip() and "\r" not in line and not re.search(r"\d+%\|", line)]


def assert_refused(outcome, *fragments, code=2, stdout_empty=False):
    """The project's rule for bad input: one line naming what is wrong, no traceback; for a
    process (or run_main), that line alone on stderr ("error: ..."), exit code `code`, and with
    stdout_empty nothing on stdout either. outcome: a CompletedProcess, an exception, or pytest's
    ExceptionInfo. Returns the line."""
    if isinstance(outcome, pytest.ExceptionInfo):
        outcome = outcome.value
    if isinstance(outcome, BaseException):
        line = str(outcome)
        assert line.strip() and "\n" not in line.strip(), line
    else:
        assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
        assert outcome.returncode == code, (outcome.returncode, outcome.stderr[-2000:])
        assert not stdout_empty or outcome.stdout == "", outcome.stdout[-2000:]
        lines = message_lines(outcome.stderr)
        assert len(lines) == 1 and "error: " in lines[0], outcome.stderr[-2000:]
        line = lines[0]
    for fragment in fragments:
        assert str(fragment) in line, line
    return line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- small models ------------------------------------------------------------------------------

def tiny_model(seed=0, std=None, **overrides):
    """A small Transformer. std: weights drawn at that scale (attention far from uniform, so that a
    RoPE or cache bug cannot hide) instead of the training initialisation."""
    from model import ModelArgs, Transformer
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=8, max_seq_len=32)
    args.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**args))
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.normal_(0, std)
    return model.eval()


def greedy(model, n, prompt=None, **kwargs):
    """n greedy tokens after prompt (default: a lone BOS), through decoding.generate: (batch, n)."""
    from decoding import generate
    prompt = torch.tensor([[BOS]]) if prompt is None else prompt
    return torch.stack(list(generate(model, prompt, n, temperature=0, **kwargs)), dim=1)


def write_shards(data_dir, shards):
    """shards: list of record lists -> {data_dir}/TinyStories_all_data/dataNN.json."""
    out = os.path.join(data_dir, "TinyStories_all_data")
    os.makedirs(out, exist_ok=True)
    for i, records in enumerate(shards):
        with open(os.path.join(out, f"data{i:02d}.json"), "w", encoding="utf-8") as f:
            json.dump(records, f)


def write_tiny_tokenizer(folder, vocab_size=40):
    """A sentencepiece BPE of vocab_size pieces, trained in about a second."""
    import random

    import sentencepiece as spm
    rng = random.Random(0)
    words = ["cat", "dog", "ran", "sun", "tree", "happy", "little", "big", "jumped", "home"]
    words += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 7))) for _ in range(60)]
    text = os.path.join(folder, "text.txt")
    with open(text, "w") as f:
        for _ in range(400):
            f.write(" ".join(rng.choice(words) for _ in range(8)) + ".\n")
    prefix = os.path.join(folder, "tok")
    spm.SentencePieceTrainer.train(input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
                                   minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    return prefix + ".model"


# ---- tiny training data and runs ---------------------------------------------------------------

def rule_stream(rng, n_stories, length=40):
    """Stories of BOS + a deterministic chain (next = f(token)): learnable within a few steps."""
    out = []
    for _ in range(n_stories):
        token = int(rng.integers(3, VOCAB))
        story = [BOS]
        for _ in range(int(rng.integers(length // 2, length))):
            story.append(token)
            token = (token * 5 + 7) % (VOCAB - 3) + 3
        out += story
    return np.array(out, dtype=np.uint16)


def write_pretrain_shards(data_dir, n_shards=3, seed=0):
    folder = os.path.join(data_dir, f"tok{VOCAB}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_shards):
        rule_stream(rng, 200).tofile(os.path.join(folder, f"data{i:02d}.bin"))
    return data_dir


def write_instruct_shards(data_dir, n_shards=2, rows=64, width=33, seed=0):
    """Rows of prompt + BOS + story + EOS, zero-padded; the story follows the prompt's last token."""
    folder = os.path.join(data_dir, f"instruct{VOCAB}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        tokens = np.zeros((rows, width), dtype=np.uint16)
        lengths = np.zeros((rows, 2), dtype=np.int32)
        for r in range(rows):
            prompt = list(rng.integers(3, VOCAB, size=int(rng.integers(3, 8))))
            token, story = prompt[-1], []
            for _ in range(int(rng.integers(5, width - len(prompt) - 2))):
                token = (token * 5 + 7) % (VOCAB - 3) + 3
                story.append(token)
            row = prompt + [BOS] + story + [EOS]
            tokens[r, :len(row)] = row
            lengths[r] = (len(prompt), len(row))
        np.save(os.path.join(folder, f"data{s:02d}.tokens.npy"), tokens)
        np.save(os.path.join(folder, f"data{s:02d}.lengths.npy"), lengths)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": VOCAB, "max_seq_len": width - 1, "tokenizer": "tok64.model"}, f)
    return data_dir


def tiny_config(data_dir, out_dir, **overrides):
    """train.py's settings for a tiny model on the data above: a run takes about a second."""
    import train
    c = dict(train.DEFAULTS)
    c.update(data_dir=str(data_dir), out_dir=str(out_dir), vocab_source="custom", vocab_size=VOCAB,
             dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=8, max_seq_len=32,
             batch_size=8, gradient_accumulation_steps=2, learning_rate=3e-3, max_iters=20,
             warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=1, device="cpu",
             dtype="float32", compile=False, peak_flops=1e12)
    c.update(overrides)
    return c


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir) if not r.get("eval")}


def run_make(target, demo_dir, *variables):
    """A Makefile demo target on a tiny corpus (2 shards x 300 stories), one thread; must succeed."""
    done = subprocess.run(["make", "--no-print-directory", target, f"PY={sys.executable}", f"DEMO_DIR={demo_dir}",
                           "DEMO_SHARDS=2", "DEMO_STORIES=300", *variables],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# ---- the published facts (formats.md) ----------------------------------------------------------
# The team's reference, ../shared/docs/formats.md, where this checkout sits beside it; a fresh clone
# reads the copy shipped in tests/data, and where both exist they must agree.

SHARED_FORMATS_MD = os.path.join(ROOT, "..", "shared", "docs", "formats.md")
SHIPPED_FORMATS_MD = os.path.join(TEST_DATA, "formats_reference.md")
GREEDY_STORY = os.path.join(TEST_DATA, "stories260K_greedy.txt")


def formats_text() -> str:
    with open(SHIPPED_FORMATS_MD, encoding="utf-8") as f:
        return f.read()


def formats_section(number: int) -> str:
    """The text of '## {number}. ...' in formats.md."""
    found = re.search(rf"^## {number}\. .*?(?=^## |\Z)", formats_text(), flags=re.S | re.M)
    assert found, f"formats.md has no section {number}"
    return found.group(0)


def greedy_story() -> str:
    """stories260K's greedy 200 tokens from a lone BOS: llama2.c's published expectation, which
    formats.md section 9 quotes."""
    with open(GREEDY_STORY, encoding="utf-8") as f:
        shipped = f.read().removesuffix("\n")
    block = re.search(r"^```\n(.*?)\n```", formats_section(9), flags=re.S | re.M)
    assert block and block.group(1) == shipped, "tests/data/stories260K_greedy.txt differs from formats.md section 9"
    return shipped


def readme_prompt(verb: str, noun: str, adjective: str) -> str:
    """Section 7's README prompt template filled in (the doc wraps it over several lines)."""
    found = re.search(r"README promises prompts of the form: `(.*?)`", formats_section(7), flags=re.S)
    assert found, "formats.md section 7 has no README prompt"
    template = re.sub(r"\s*\n\s*", " ", found.group(1))
    return template.replace("{verb}", verb).replace("{noun}", noun).replace("{adj}", adjective)


def param_counts() -> dict:
    """Section 1's published parameter counts, e.g. {'260K': 260032, '15M': 15191712, ...}."""
    line = re.search(r"Parameter counts.*?(?=\n\n|\n\|)", formats_section(1), flags=re.S).group(0)
    return {name: int(count.replace(",", "")) for name, count in re.findall(r"(\d+[KM]) config ([\d,]+)", line)}


def model_table() -> dict:
    """Section 1's table: {'stories15M': {'dim': 288, 'n_layers': 6, ...}, ...}."""
    rows = {}
    for line in formats_section(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("stories"):
            dim, n_layers, n_heads, n_kv_heads, vocab, multiple_of, max_seq_len = (int(c.split()[0]) for c in cells[1:8])
            rows[cells[0]] = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=vocab, multiple_of=multiple_of, max_seq_len=max_seq_len)
    return rows


def hidden_dim_examples() -> list:
    """Section 1's hidden_dim rule examples: [(dim, multiple_of, hidden_dim), ...]."""
    return [tuple(map(int, m)) for m in re.findall(r"dim (\d+)/mult (\d+) -> (\d+)", formats_section(1))]
