# The original instruct storyteller's from-scratch run (docs/formats.md, "The original instruct
# storyteller"): the stories15M shape
# trained directly on instruct examples (python prepare_instruct_data.py --vocab_size=0 --tokenizer=...).
# batch 64 x 8 accumulation, AdamW 5e-4 (0.9, 0.95) wd 0.1, warmup 1000, cosine to 0 at 25,000, clip 1, bf16.
# Expected hardware/time: one A100/H100, several hours; far too slow for a CPU.
dataset = "instruct"
vocab_source = "llama2"
vocab_size = 32000
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
multiple_of = 32
max_seq_len = 350
batch_size = 64
gradient_accumulation_steps = 8
learning_rate = 5e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 1000
max_iters = 25000
lr_decay_iters = 25000
min_lr = 0.0
dtype = "bfloat16"
out_dir = "out/instruct15M"
