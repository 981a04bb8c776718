# The quickstart's instruct model (make demo): trained from scratch on the offline demo corpus
# (tinystories.py make_demo; train_vocab --vocab_size=1024 --include_prompts;
# prepare_instruct_data.py --vocab_size=1024 --max_seq_len=192).
# 2 CPU cores: 1,200 iterations in 2.5 minutes (Intel VM) to about 6.5 (Zen 3, estimated); the
# model then uses all three requested words in 98-100% of stories for held-out word triples on 3
# seeds (docs/finetuning.md, "Results", row K). 1,500 iterations did not fit 10 minutes of `make demo` on
# the slowest CPU.
dataset, data_dir, out_dir = "instruct", "data", "out/demo/instruct"
vocab_source, vocab_size = "custom", 1024
dim, n_layers, n_heads, n_kv_heads, multiple_of, max_seq_len = 128, 4, 4, 4, 32, 192
batch_size, gradient_accumulation_steps = 16, 1
learning_rate, max_iters, warmup_iters = 3e-3, 1200, 50
eval_interval, eval_iters, log_interval = 500, 5, 50
# this small model is overhead-bound on a CPU: float32 eager measured faster than bfloat16
# autocast, and compiling costs about a minute on 2 cores
dtype = "float32"
compile = False
