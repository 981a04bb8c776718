# llama2.c's stories260K shape: custom 512-token vocabulary (python tinystories.py train_vocab --vocab_size=512).
# Expected hardware/time: one GPU, ~10 minutes; a 2-core CPU gets there in hours (bf16 autocast).
vocab_source, vocab_size = "custom", 512
dim, n_layers, n_heads, n_kv_heads, multiple_of, max_seq_len = 64, 5, 8, 4, 4, 512
dropout = 0.05
batch_size, gradient_accumulation_steps = 128, 1
learning_rate, max_iters, warmup_iters = 5e-4, 100000, 1000
eval_interval = 2000
out_dir = "out/stories260K"
