"""The fast sampling path: the compiled decode step against the eager one, int8 weights against
float32, and the kernel's fallback. Nothing here is timed (bench/generation.py measures speed).

A cold torch.compile of stories260K's decode step takes about 35 s on 2 cores, the second model
about 10 s more; with inductor's cache warm (a second run) both take a few seconds."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import decode_package
import generate
from checkpoints import load_model
from decoding import decoder_for, fuse_projections, generate as decode, prepare_for_sampling
from model import ModelArgs, Transformer
from evaluate import run_requests
from story_requests import Request
from helpers import ROOT, assert_refused, greedy, greedy_story, run_main
from prompts import prompt_format
from quantize import Int8Linear, quantize_int8
from sampling import exponential_noise, pick_token, sample
from tokenizer import Tokenizer

BOS = 1


def stories260K(shared_data, quantize="none"):
    model, _ = load_model(os.path.join(shared_data, "stories260K.pt"))
    return prepare_for_sampling(model, quantize)


# ---- the compiled decode step ----------------------------------------------------------------

def test_compiled_stories260K_prints_the_published_story_without_recompiling(shared_data):
    model = stories260K(shared_data)
    eager = greedy(model, 200, torch.tensor([[BOS]]))
    steps = decode(model, torch.tensor([[BOS]]), 200, temperature=0, compile=True)
    before = counters["stats"]["unique_graphs"]
    compiled = [next(steps), next(steps)]  # the prompt's prefill (eager), then the first decode step
    assert counters["stats"]["unique_graphs"] == before + 1
    # every later position reuses that one graph: a recompile would raise here
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled += list(steps)
        again = greedy(model, 200, torch.tensor([[BOS]]), compile=True)  # a new cache, same shapes
    ids = torch.stack(compiled, dim=1)
    assert ids.shape == (1, 200)
    assert torch.equal(ids, eager) and torch.equal(again, eager)
    tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    assert tokenizer.decode(ids[0].tolist()) == greedy_story()
    assert counters["stats"]["unique_graphs"] == before + 1


def test_compiled_matches_eager_on_a_random_stories15M_shaped_model():
    """stories15M's widths (dim 288, 6 heads, hidden 768, vocab 32000) with 2 of its 6 layers,
    to keep the compile short; a batch of 3 different prompts."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=288, n_layers=2, n_heads=6, hidden_dim=768, vocab_size=32000,
                                  max_seq_len=256)).eval()
    with torch.no_grad():  # weights large enough that the greedy choice is far from uniform
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    fuse_projections(model)
    prompts = torch.randint(3, 32000, (3, 5), generator=torch.Generator().manual_seed(1))
    eager = greedy(model, 24, prompts)
    assert len({tuple(r) for r in eager.tolist()}) == 3
    assert torch.equal(greedy(model, 24, prompts, compile=True), eager)
    # compiled, the 32,000 logits are ranked in bfloat16 and only the best candidates' computed
    # exactly (decoding.RANKED_SPARE): top-k draws from the same noise still pick the same tokens
    ranker = decoder_for(model).ranker
    assert ranker is not None and ranker.dtype == torch.bfloat16
    drawn = [torch.stack(list(decode(model, prompts, 24, temperature=0.8, top_k=10, compile=compile,
                                             generator=torch.Generator().manual_seed(5))), dim=1)
             for compile in (False, True)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], eager)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_greedy_matches_eager_on_random_weights_with_near_ties(seed):
    """A freshly initialised model whose classifier rows come in groups of 32 twins with equal
    bfloat16 copies (each weight within 2^-12 of its group's, under half a bfloat16 step), so the
    compiled step's bfloat16 ranking of a large vocabulary cannot tell which twin is best. It must
    see that from its error bound (decoding.RANK_ERROR) and take every exact logit, picking what
    the eager argmax picks (the twins' float32 logits lie far more than a rounding apart).
    8192 tokens: the smallest vocabulary that is ranked; one narrow layer, a short compile."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, hidden_dim=96, vocab_size=8192,
                                  max_seq_len=64)).eval()
    with torch.no_grad():
        groups = (0.1 * torch.randn(8192 // 32, 64)).bfloat16().float().repeat_interleave(32, dim=0)
        twins = groups * (1 + 2.0 ** -12 * (2 * torch.rand(8192, 64) - 1))
        assert torch.equal(twins.bfloat16().float(), groups)
        model.output.weight.copy_(twins)
    fuse_projections(model)
    prompts = torch.randint(3, 8192, (2, 3), generator=torch.Generator().manual_seed(seed))
    torch._dynamo.reset()
    assert torch.equal(greedy(model, 12, prompts, compile=True), greedy(model, 12, prompts))
    assert decoder_for(model).ranker is not None


def test_evaluate_samples_every_prompt_length_through_one_compiled_graph(shared_data):
    """Seven prompts of six token lengths , four to a batch (the second batch filled up with
    copies): one graph, and each greedy story, compiled or eager, is the one its prompt gets alone."""
    model = stories260K(shared_data)
    tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    fmt = prompt_format(False)  # stories260K continues the prompt's text: each prompt its own story
    requests = [Request("run", "dog", "big"), Request("run", "dog", "big", ["dialogue"]),
                Request("jump", "ball", "red", ["dialogue", "twist"]), Request("sing", "cat", "happy"),
                Request("climb", "tree", "tall", ["badending"]), Request("eat", "cake", "sweet"),
                Request("swim", "fish", "small", ["moralvalue", "foreshadowing"])]
    lengths = {len(generate.prompt_ids(tokenizer, r.prompt, False, None)) for r in requests}
    assert len(lengths) >= 5, lengths
    before = counters["stats"]["unique_graphs"]
    compiled = run_requests(model, tokenizer, requests, fmt, 40, 0.0, None, 1.0, 0, compile=True, batch_size=4)
    assert counters["stats"]["unique_graphs"] == before + 1
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second run reuses that graph
        again = run_requests(model, tokenizer, requests[:3], fmt, 40, 0.0, None, 1.0, 0, compile=True, batch_size=4)
    eager = run_requests(model, tokenizer, requests, fmt, 40, 0.0, None, 1.0, 0, compile=False, batch_size=4)
    alone = {r.prompt: run_requests(model, tokenizer, [r], fmt, 40, 0.0, None, 1.0, 0, compile=False)[0]["story"]
             for r in requests}
    assert len(compiled) == len(eager) == 7 and len(set(alone.values())) > 3
    assert {row["story"] for row in compiled} == set(alone.values())
    for row in compiled + again + eager:
        assert row["story"] == alone[Request(row["verb"], row["noun"], row["adjective"], row["features"]).prompt]


def test_generate_compile_builds_a_checked_package_once_and_a_second_run_loads_it(shared_data, tmp_path,
                                                                                  monkeypatch, capsys):
    """generate.py --compile on stories260K: the first run compiles the decode step into an
    AOTInductor package in the cache folder (checked against the eager step: with max_autotune
    this model's package picks wrong tokens, so it is rebuilt without); the second loads it; both
    print the published greedy story, as the eager run does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = [f"--model_path={shared_data}/stories260K.pt", "--temperature=0", "--max_new_tokens=200", "--device=cpu"]
    eager = run_main(generate.main, capsys, *args)
    first, second = run_main(generate.main, capsys, *args, "--compile"), run_main(generate.main, capsys, *args, "--compile")
    assert eager.returncode == first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout == eager.stdout and eager.stdout.strip() == greedy_story().strip()
    assert "compiling the decode step" in first.stderr and "without max_autotune" in first.stderr
    assert "compiling" not in second.stderr and "compiled" in second.stderr  # the summary line
    assert len(list((tmp_path / "tinystories_instruct" / "decode").glob("*.pt2"))) == 1
    # a fresh process loads the package with nothing set up by inductor in this one (on an AMX
    # CPU it must ask Linux for the tiles itself)
    fresh = subprocess.run([sys.executable, "generate.py", *args, "--compile"], cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    assert fresh.returncode == 0 and fresh.stdout == eager.stdout, fresh.stderr
    assert "compiling" not in fresh.stderr


def test_the_same_seed_samples_the_same_story_with_and_without_the_package(shared_data, tmp_path,
                                                                            monkeypatch, capsys):
    """At temperature 0.8 the draws come from --seed's generator: the package takes them in the
    eager step's order (one draw for the whole prompt, then one a token)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = [f"--model_path={shared_data}/stories260K.pt", "--prompt=Once upon a time", "--temperature=0.8",
            "--max_new_tokens=60", "--seed=7", "--device=cpu"]
    eager = run_main(generate.main, capsys, *args, "--no-compile")
    compiled = run_main(generate.main, capsys, *args, "--compile")
    other_seed = run_main(generate.main, capsys, *args[:-2], "--seed=8", "--device=cpu", "--no-compile")
    assert eager.returncode == compiled.returncode == 0, compiled.stderr
    assert "compiled)" in compiled.stderr and "compiled" not in eager.stderr
    assert compiled.stdout == eager.stdout and other_seed.stdout != eager.stdout
    # evaluate.py, --compile unset, finds that package (batch 1, these settings) and samples through it
    loaded = []
    cached = decode_package.cached
    monkeypatch.setattr(decode_package, "cached", lambda *a, **k: loaded.append(cached(*a, **k)) or loaded[-1])
    model, tokenizer = stories260K(shared_data), Tokenizer(os.path.join(shared_data, "tok512.model"))
    requests = [Request("run", "dog", "big"), Request("sing", "cat", "happy", ["dialogue"])]
    fmt = prompt_format(False)
    packaged = run_requests(model, tokenizer, requests, fmt, 40, 0.8, 10, 1.0, 3, compile=None, batch_size=1)
    assert len(loaded) == 1 and loaded[0] is not None
    assert packaged == run_requests(model, tokenizer, requests, fmt, 40, 0.8, 10, 1.0, 3, compile=False, batch_size=1)


def test_a_package_is_kept_per_cpu_instruction_sets(monkeypatch):
    """A cache folder shared between machines must not hand AVX-512 or AMX kernels to a CPU
    without them: the package's key holds the CPU's instruction sets."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    here = decode_package.package_key(model, 1, 0.0, None, 1.0)
    assert decode_package.cpu_features()  # /proc/cpuinfo's flags on Linux
    assert decode_package.package_key(model, 1, 0.0, None, 1.0) == here
    monkeypatch.setattr(decode_package, "cpu_features", lambda: "fpu sse sse2 avx avx2")
    assert decode_package.package_key(model, 1, 0.0, None, 1.0) != here


# ---- the sampler -----------------------------------------------------------------------------

def test_the_exponential_race_draws_from_the_cut_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]])).repeat(40000, 1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, 1.0, generator=generator), minlength=4) / 40000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.25, 0.15, 0.1]), atol=0.01, rtol=0)
    # top_k=2 renormalises over the two most likely; top_p=0.7 keeps the tokens before 70% is reached
    counts = torch.bincount(sample(logits, 1.0, top_k=2, generator=generator), minlength=4) / 40000
    torch.testing.assert_close(counts, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.01, rtol=0)
    counts = torch.bincount(sample(logits, 1.0, top_p=0.7, generator=generator), minlength=4) / 40000
    torch.testing.assert_close(counts, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.01, rtol=0)
    # a low temperature sharpens: 0.5 squares the odds
    counts = torch.bincount(sample(logits, 0.5, generator=generator), minlength=4) / 40000
    torch.testing.assert_close(counts, torch.tensor([25, 6.25, 2.25, 1]) / 34.5, atol=0.01, rtol=0)


@pytest.mark.parametrize("width", [500, 1024])  # 1024: the compiled argmax goes in blocks of 256
def test_the_compiled_sampler_picks_what_the_eager_one_picks(width):
    torch._dynamo.reset()  # each setting is a graph of its own, under dynamo's limit per function
    logits = torch.randn(8, width, generator=torch.Generator().manual_seed(3)) * 3
    compiled = torch.compile(pick_token, fullgraph=True)
    for temperature, top_k, top_p in [(0, None, 1.0), (0.8, 10, 1.0), (1.0, None, 0.9), (0.5, 40, 0.8)]:
        noise = exponential_noise(8, width, temperature, top_k, torch.Generator().manual_seed(4))
        assert torch.equal(compiled(logits, temperature, top_k, top_p, noise),
                           pick_token(logits, temperature, top_k, top_p, noise))


def test_the_compiled_greedy_pick_keeps_the_first_of_tied_maxima():
    logits = torch.randn(5, 1024, generator=torch.Generator().manual_seed(5)).bfloat16()
    logits[0, [700, 300]] = 9.0  # tied across blocks: the earlier block wins
    logits[1, [513, 600, 1000]] = 9.0  # tied within a block and across
    logits[2, [0, 1023]] = 9.0  # the row's two ends
    logits[3] = 1.0  # all tied
    torch._dynamo.reset()
    compiled = torch.compile(pick_token, fullgraph=True)
    picks = compiled(logits, 0, None, 1.0, None)
    assert picks.tolist()[:4] == [300, 513, 0, 0]
    assert torch.equal(picks, logits.argmax(dim=-1))


# ---- int8 weights ----------------------------------------------------------------------------

def test_int8_stories260K_keeps_the_greedy_story_and_logits_close(shared_data, capsys):
    reference = stories260K(shared_data)
    model = stories260K(shared_data, "int8")
    # every matmul is int8 (the classifier too), and stories260K's w2 (172 inputs, not a
    # multiple of 16) is the one shape that falls back, said once
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 5 * 4 + 1  # wqkv, wo, w13, w2 in 5 layers; the classifier
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert [m.in_features for m in linears if not m.use_kernel] == [172] * 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "172" in err[0] and "multiple of 16" in err[0], err

    ref_ids = greedy(reference, 200, torch.tensor([[BOS]]))
    ids = greedy(model, 200, torch.tensor([[BOS]]))
    assert torch.equal(ids[:, :50], ref_ids[:, :50])
    # per-token logits along the float32 model's story (measured: max 0.39 of logits up to 22)
    tokens = torch.cat((torch.tensor([[BOS]]), ref_ids), dim=1)
    with torch.no_grad():
        want, got = reference(tokens, all_logits=True)[0], model(tokens, all_logits=True)[0]
    assert want.abs().max() > 10
    assert (got - want).abs().max() < 0.6
    assert (got - want).abs().mean() < 0.1
    assert not torch.equal(got, want)  # really quantized


@pytest.mark.parametrize("in_features, kernel", [(64, True), (40, False), (172, False)])
def test_int8_linear_is_right_on_and_off_the_kernel(in_features, kernel):
    """The layer against the dequantized weight, at batch sizes 1, 3 and 8 (the kernel
    blocks rows by 4). 40 and 172 inputs would give the kernel wrong results or a crash."""
    torch.manual_seed(in_features)
    weight = torch.randn(100, in_features)
    layer = Int8Linear(weight, use_kernel=kernel)
    dequantized = layer.weight.float() * layer.scales.float()[:, None]
    # the quantization error of one weight is at most half a step
    assert ((dequantized - weight).abs() <= layer.scales.float()[:, None] * 0.5001).all()
    for rows in (1, 3, 8):
        x = torch.randn(rows, in_features)
        # on the kernel the activations are rounded to bfloat16, so compare to that input
        x_in = x.bfloat16().float() if kernel else x
        torch.testing.assert_close(layer(x), F.linear(x_in, dequantized), rtol=1e-2, atol=1e-2)


def test_quantize_says_once_which_shapes_fall_back():
    args = ModelArgs(dim=48, n_layers=3, n_heads=4, hidden_dim=40, vocab_size=64, max_seq_len=16)
    messages = []

    class Stream:
        def write(self, text):
            messages.append(text)

    model = quantize_int8(Transformer(args).eval(), stream=Stream())
    text = "".join(messages)
    assert text.count("\n") == 1 and "w2 48x40 (3x)" in text, text
    assert sum(not m.use_kernel for m in model.modules() if isinstance(m, Int8Linear)) == 3


# ---- the command line ------------------------------------------------------------------------

def test_cli_int8_bfloat16_and_flag_errors(shared_data, capsys):
    model = os.path.join(shared_data, "stories260K.pt")
    story = greedy_story()
    result = run_main(generate.main, capsys, f"--model_path={model}", "--temperature=0", "--max_new_tokens=60",
                      "--device=cpu", "--quantize=int8")
    assert result.returncode == 0, result.stderr
    # the first 50 tokens are the float32 story's, so its first line matches in full
    assert result.stdout.startswith(story.split("\n")[0][:100])
    assert "int8 weights" in result.stderr and result.stderr.count("int8: ") == 1
    result = run_main(generate.main, capsys, f"--model_path={model}", "--temperature=0", "--max_new_tokens=30",
                      "--device=cpu", "--dtype=bfloat16")
    assert result.returncode == 0, result.stderr
    assert_refused(run_main(generate.main, capsys, f"--model_path={model}", "--compile", "--no_kv_cache",
                                "--device=cpu"), "--compile", "--no_kv_cache", stdout_empty=True)
    assert_refused(run_main(generate.main, capsys, f"--model_path={model}", "--quantize=int4", "--device=cpu"),
                       "--quantize", stdout_empty=True)
