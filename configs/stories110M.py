# llama2.c's stories110M shape on the Llama 2 tokenizer (published val loss 0.760).
# Expected hardware/time: 4-8 A100/H100s (torchrun), days; not a CPU job.
vocab_source, vocab_size = "llama2", 32000
dim, n_layers, n_heads, n_kv_heads, multiple_of, max_seq_len = 768, 12, 12, 12, 32, 1024
batch_size, gradient_accumulation_steps = 32, 16
learning_rate, max_iters, warmup_iters = 5e-4, 298000, 1000
out_dir = "out/stories110M"
