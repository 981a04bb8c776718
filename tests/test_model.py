"""The model against the published facts: parameter counts, llama2.c's real stories260K output,
Hugging Face's LlamaForCausalLM, and the KV cache against the plain forward pass."""
import os

import pytest
import torch

from helpers import greedy_story, hidden_dim_examples, model_table, param_counts, tiny_model
from decoding import decoder_for, generate
from model import ModelArgs, Transformer
from sampling import sample

BOS = 1


def random_model(seed=0, std=0.3, **overrides):
    """A small model with weights large enough that attention is far from uniform: with the
    default 0.02 init every position would look alike and a RoPE or cache bug could hide."""
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
    return tiny_model(seed, std, **{**shape, **overrides})


def load_llama2c_pt(path):
    """stories260K.pt read directly (not through checkpoints/): dict of model + model_args."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    model = Transformer(ModelArgs(**obj["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in obj["model"].items()})
    return model.eval(), obj


# ---- sizes -----------------------------------------------------------------------------------

def test_hidden_dim_rule_matches_the_documented_examples():
    examples = hidden_dim_examples()
    assert len(examples) == 4
    for dim, multiple_of, hidden in examples:
        assert ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of).hidden_dim == hidden


def test_parameter_counts_of_the_published_configs():
    counts, table = param_counts(), model_table()
    assert set(counts) == {"260K", "15M", "42M", "110M"}
    for name, config in table.items():
        # the meta device allocates nothing: the 110M model costs no memory or init time
        with torch.device("meta"):
            model = Transformer(ModelArgs(**config))
        # parameters() yields the tied embedding/output matrix once, as the doc counts it
        assert sum(p.numel() for p in model.parameters()) == counts[name.removeprefix("stories")], name
        assert model.output.weight is model.tok_embeddings.weight


def test_loss_ignores_minus_one_targets():
    model = random_model()
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    targets[0, :4] = -1
    targets[1, 7:] = -1
    logits, loss = model(tokens, targets)
    keep = targets != -1
    # only the scored positions get logits, and they are the full forward's at those positions
    every = model(tokens, all_logits=True)[0]
    torch.testing.assert_close(logits, every[keep], rtol=1e-5, atol=1e-6)
    # mean negative log-likelihood over the kept positions only, computed by hand
    logp = every.float().log_softmax(-1)[keep]
    expected = -logp.gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # and changing the ignored targets to other real ids would change the loss
    targets_all = targets.clone()
    targets_all[~keep] = 5
    assert not torch.isclose(model(tokens, targets_all)[1], loss)


# ---- the real stories260K --------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("filename", ["stories260K.pt", "stories260K.bin"])
def test_stories260K_greedy_reproduces_llama2c(shared_data, filename, use_cache):
    from checkpoints import load_model
    from tokenizer import Tokenizer
    expected = greedy_story()
    model, _ = load_model(os.path.join(shared_data, filename))
    tokenizer = Tokenizer(os.path.join(shared_data, "tok512.model"))
    steps = list(generate(model, torch.tensor([[BOS]]), 200, temperature=0.0, use_cache=use_cache))
    ids = [int(s) for s in steps]
    assert len(ids) == 200
    assert tokenizer.decode(ids) == expected


# ---- Hugging Face LlamaForCausalLM -----------------------------------------------------------

def to_hf_state_dict(state, args: ModelArgs):
    """llama2.c keys -> LlamaForCausalLM keys (formats.md section 8), written independently of
    the project's exporter. wq/wk rows are regrouped per head from adjacent (even, odd) pairs
    to HF's [all evens | all odds] halves, since HF's rotary embedding rotates halves."""
    hd = args.dim // args.n_heads

    def halves(w, n_heads):
        return w.view(n_heads, hd // 2, 2, args.dim).transpose(1, 2).reshape(n_heads * hd, args.dim)

    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
           "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = halves(state[src + "attention.wq.weight"], args.n_heads)
        out[dst + "self_attn.k_proj.weight"] = halves(state[src + "attention.wk.weight"], args.n_kv_heads)
        out[dst + "self_attn.v_proj.weight"] = state[src + "attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = state[src + "attention.wo.weight"]
        out[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w2.weight"]
        out[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w3.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
    return out


def hf_model(model: Transformer):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    a = model.args
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        rms_norm_eps=a.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=a.max_seq_len, tie_word_embeddings=True, hidden_act="silu",
        attention_dropout=0.0)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), a), strict=True)
    return hf


def assert_logits_match_hf(model, tokens):
    hf = hf_model(model)
    with torch.no_grad():
        ours = model(tokens, all_logits=True)[0]
        theirs = hf(input_ids=tokens).logits
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 0.5  # logits far from zero, so 1e-4 is a real bound
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_hugging_face_llama(n_kv_heads):
    model = random_model(seed=n_kv_heads, std=0.1, n_heads=4, n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_logits_match_hf(model, tokens)


def test_hugging_face_check_catches_an_unpermuted_rope_layout():
    """The comparison above is sensitive: without the per-head wq/wk regrouping it fails."""
    model = random_model(seed=4, std=0.1, n_heads=4, n_kv_heads=2)
    hf = hf_model(model)
    state = to_hf_state_dict(model.state_dict(), model.args)
    for i in range(model.args.n_layers):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = model.layers[i].attention.wq.weight
        state[f"model.layers.{i}.self_attn.k_proj.weight"] = model.layers[i].attention.wk.weight
    hf.load_state_dict(state)
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens, all_logits=True)[0] - hf(input_ids=tokens).logits).abs().max()
    assert diff > 1e-2


def test_stories260K_logits_match_hugging_face_llama(shared_data):
    model, _ = load_llama2c_pt(os.path.join(shared_data, "stories260K.pt"))
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = BOS
    assert_logits_match_hf(model, tokens)


# ---- KV cache --------------------------------------------------------------------------------

def greedy_without_model_generate(model, prompt, n):
    """Reference greedy decoding: re-run the full forward pass and take the argmax each step."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(tokens, all_logits=True)[0][:, -1].argmax(-1)
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
    return tokens[:, prompt.shape[1]:]


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_kv_cache_matches_no_cache_for_a_batch_of_different_prompts(n_kv_heads):
    model = random_model(seed=10 + n_kv_heads, n_kv_heads=n_kv_heads)
    prompts = torch.randint(3, 97, (4, 7), generator=torch.Generator().manual_seed(3))
    n = 40
    cached = torch.stack(list(generate(model, prompts, n, temperature=0, use_cache=True)), dim=1)
    plain = torch.stack(list(generate(model, prompts, n, temperature=0, use_cache=False)), dim=1)
    reference = greedy_without_model_generate(model, prompts, n)
    assert cached.shape == (4, n)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, reference)
    # the rows really differ, so a mix-up between batch rows would show
    assert len({tuple(r) for r in cached.tolist()}) == 4
    # each row as it comes out alone
    for i in range(4):
        alone = torch.stack(list(generate(model, prompts[i:i + 1], n, temperature=0)), dim=1)
        assert torch.equal(alone[0], cached[i])


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_chunked_prefill_after_cached_prefix_matches_full_forward(n_kv_heads):
    model = random_model(seed=20 + n_kv_heads, n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens, all_logits=True)[0]
        model.setup_cache(3, 32)
        decoder = decoder_for(model)
        decoder.refresh_classifier()
        try:
            first = decoder.prefill(tokens[:, :6])                           # positions 0..5
            chunk = model(tokens[:, 6:15], input_pos=torch.arange(6, 15), all_logits=True)[0]
            steps = [decoder.decode_step(model, tokens[:, p:p + 1], torch.tensor([p])) for p in range(15, 20)]
        finally:
            model.clear_cache()
    # float32 rounding differs between one long and several short attention calls: 1e-4
    close = dict(rtol=1e-4, atol=1e-4)
    assert full.abs().max() > 1  # logits large enough for the bound to mean something
    torch.testing.assert_close(first, full[:, 5], **close)
    torch.testing.assert_close(chunk, full[:, 6:15], **close)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 15:20], **close)


def test_generate_stops_each_sample_at_a_stop_id_and_ends_when_all_stopped():
    model = random_model(seed=7)
    prompts = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(8))
    free = torch.stack(list(generate(model, prompts, 30, temperature=0)), dim=1)
    stop = int(free[1, 3])  # row 1 produces this id at step 3 (other rows may too, maybe later)
    out = torch.stack(list(generate(model, prompts, 30, temperature=0, stop_ids=[stop])), dim=1)
    for row, ref in zip(out.tolist(), free.tolist()):
        first = ref.index(stop) if stop in ref else None
        if first is None:
            assert row == ref[:len(row)]
        else:  # identical up to the stop id, then the stop id repeated
            assert row[:first + 1] == ref[:first + 1]
            assert all(t == stop for t in row[first:])
    expected_len = max(ref.index(stop) + 1 if stop in ref else 30 for ref in free.tolist())
    assert out.shape[1] == expected_len


def test_generate_fills_the_context_and_never_runs_past_it():
    """16 positions, a 10-token prompt: 7 new tokens, since the 7th is never fed back in."""
    model = random_model(seed=9, max_seq_len=16)
    prompt = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(9))
    full = torch.stack(list(generate(model, prompt, 50, temperature=0, use_cache=False)), dim=1)
    cached = torch.stack(list(generate(model, prompt, 50, temperature=0, use_cache=True)), dim=1)
    assert full.shape == (2, 7)
    assert torch.equal(cached, full)
    # the 7th token is the argmax after all 16 positions, as the full forward pass sees it
    context = torch.cat((prompt, full[:, :6]), dim=1)
    assert context.shape[1] == 16
    assert torch.equal(full[:, 6], model(context)[0][:, -1].argmax(-1))


# ---- sampling --------------------------------------------------------------------------------

def random_logits(seed=0, batch=64, vocab=500):
    return 3 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_temperature_zero_is_argmax():
    logits = random_logits()
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_one_is_greedy():
    logits = random_logits(1)
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        assert torch.equal(sample(logits, temperature, top_k=1, generator=gen), logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = random_logits(2)
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        assert torch.equal(sample(logits, temperature, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_top_k_and_top_p_only_pick_from_the_allowed_set():
    logits = random_logits(3, batch=8, vocab=50).repeat_interleave(200, dim=0)
    gen = torch.Generator().manual_seed(0)
    picked = sample(logits, 1.0, top_k=5, generator=gen)
    top5 = logits.topk(5, dim=-1).indices
    assert (picked[:, None] == top5).any(-1).all()
    assert len(set(picked[:200].tolist())) > 1  # it samples, not argmax
    # nucleus: the smallest set of most likely tokens whose probability reaches 0.6
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    size = (probs.cumsum(-1) < 0.6).sum(-1) + 1
    picked = sample(logits, 1.0, top_p=0.6, generator=gen)
    rank = (order == picked[:, None]).float().argmax(-1)
    assert (rank < size).all()


def test_seeded_generator_is_reproducible():
    logits = random_logits(4)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(123))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(123))
    c = sample(logits, 1.0, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    model = random_model(seed=11)
    prompt = torch.tensor([[BOS]] * 3)
    runs = [torch.stack(list(generate(model, prompt, 30, temperature=1.0, top_k=20,
                                            generator=torch.Generator().manual_seed(s))), dim=1)
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_sampling_with_cache_equals_sampling_without():
    model = random_model(seed=12)
    prompt = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(12))
    runs = [torch.stack(list(generate(model, prompt, 30, temperature=0.8, top_p=0.9, use_cache=c,
                                            generator=torch.Generator().manual_seed(0))), dim=1)
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])
