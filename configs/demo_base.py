# The base of `make demo-finetune`: pretrained on the demo corpus's plain stories (make_demo;
# train_vocab --vocab_size=1024 --include_prompts; pretokenize --vocab_size=1024), in the shape of
# configs/demo_instruct.py; configs/demo_lora.py then LoRA-tunes it. max_seq_len 192 is the
# instruct rows' width, so the fine-tune meets no position the base never trained.
# 600 steps at lr 6e-3 reach the validation loss that 800 at 3e-3 did (0.70 / 0.72 against 0.70 /
# 0.73, seeds 2 / 3; docs/finetuning.md, "A 600-step base at twice the rate"). The 2-core CPU: about 1.5-3 minutes.
dataset, data_dir, out_dir = "pretrain", "data", "out/demo/base"
vocab_source, vocab_size, max_seq_len = "custom", 1024, 192
dim, n_layers, n_heads, n_kv_heads, multiple_of = 128, 4, 4, 4, 32  # configs/demo_instruct.py's shape
batch_size, gradient_accumulation_steps = 16, 1
learning_rate, max_iters, warmup_iters = 6e-3, 600, 50
eval_interval, eval_iters, log_interval = 300, 5, 50
dtype = "float32"  # an overhead-bound tiny model: float32 eager beats bf16 autocast on a CPU
compile = False
