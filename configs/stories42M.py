# llama2.c's stories42M shape on the Llama 2 tokenizer (published val loss 0.847).
# Expected hardware/time: one or more A100/H100s, about a day; not a CPU job.
vocab_source = "llama2"
vocab_size = 32000
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 8
multiple_of = 32
max_seq_len = 1024
batch_size = 32
gradient_accumulation_steps = 16
learning_rate = 5e-4
max_iters = 298000
warmup_iters = 1000
out_dir = "out/stories42M"
