# llama2.c's stories42M shape on the Llama 2 tokenizer (published val loss 0.847).
# Expected hardware/time: one or more A100/H100s, about a day; not a CPU job.
vocab_source, vocab_size = "llama2", 32000
dim, n_layers, n_heads, n_kv_heads, multiple_of, max_seq_len = 512, 8, 8, 8, 32, 1024
batch_size, gradient_accumulation_steps = 32, 16
learning_rate, max_iters, warmup_iters = 5e-4, 298000, 1000
out_dir = "out/stories42M"
