# llama2.c's stories260K shape: custom 512-token vocabulary (python tinystories.py train_vocab --vocab_size=512).
# Expected hardware/time: one GPU, ~10 minutes; a 2-core CPU gets there in hours (bf16 autocast).
vocab_source = "custom"
vocab_size = 512
dim = 64
n_layers = 5
n_heads = 8
n_kv_heads = 4
multiple_of = 4
max_seq_len = 512
dropout = 0.05
batch_size = 128
gradient_accumulation_steps = 1
learning_rate = 5e-4
max_iters = 100000
warmup_iters = 1000
eval_interval = 2000
out_dir = "out/stories260K"
