# llama2.c's stories110M shape on the Llama 2 tokenizer (published val loss 0.760).
# Expected hardware/time: 4-8 A100/H100s (torchrun), days; not a CPU job.
vocab_source = "llama2"
vocab_size = 32000
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 12
multiple_of = 32
max_seq_len = 1024
batch_size = 32
gradient_accumulation_steps = 16
learning_rate = 5e-4
max_iters = 298000
warmup_iters = 1000
out_dir = "out/stories110M"
