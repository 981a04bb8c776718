# llama2.c's stories15M shape on the Llama 2 tokenizer (data in data/tok0/, published val loss 1.072).
# Expected hardware/time: one A100/H100, a few hours for 298K iters as llama2.c ran it; not a CPU job.
vocab_source = "llama2"
vocab_size = 32000
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
multiple_of = 32
max_seq_len = 256
batch_size = 128
gradient_accumulation_steps = 4
learning_rate = 5e-4
max_iters = 298000
warmup_iters = 1000
out_dir = "out/stories15M"
