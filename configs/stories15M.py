# llama2.c's stories15M shape on the Llama 2 tokenizer (data in data/tok0/, published val loss 1.072).
# Expected hardware/time: one A100/H100, a few hours for 298K iters as llama2.c ran it; not a CPU job.
vocab_source, vocab_size = "llama2", 32000
dim, n_layers, n_heads, n_kv_heads, multiple_of, max_seq_len = 288, 6, 6, 6, 32, 256
batch_size, gradient_accumulation_steps = 128, 4
learning_rate, max_iters, warmup_iters = 5e-4, 298000, 1000
out_dir = "out/stories15M"
