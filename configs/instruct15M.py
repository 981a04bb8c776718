# The original instruct storyteller's from-scratch run (docs/formats.md, "The original instruct
# storyteller"): the stories15M shape trained directly on instruct examples (python prepare_instruct_data.py --vocab_size=0 --tokenizer=...).
# batch 64 x 8 accumulation, AdamW 5e-4 (0.9, 0.95) wd 0.1, warmup 1000, cosine to 0 at 25,000, clip 1, bf16.
# Expected hardware/time: one A100/H100, several hours; far too slow for a CPU.
dataset = "instruct"
vocab_source, vocab_size = "llama2", 32000
dim, n_layers, n_heads, n_kv_heads, multiple_of, max_seq_len = 288, 6, 6, 6, 32, 350
batch_size, gradient_accumulation_steps = 64, 8
learning_rate, max_iters, warmup_iters = 5e-4, 25000, 1000
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
lr_decay_iters = 25000
min_lr = 0.0
dtype = "bfloat16"
out_dir = "out/instruct15M"
