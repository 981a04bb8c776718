# The LoRA half of `make demo-finetune`: the base of configs/demo_base.py adapted to the demo's
# instruct examples. The study's best LoRA setting (docs/finetuning.md): rank 8 on all seven linear
# layers plus the token embedding, which the base never trained for EOS or the instruction's own
# tokens. It trains 9.4% of this tiny model's weights and, in 1,000 steps, does NOT reach the
# 90% word-use goal (docs/finetuning.md says what bounds it). The 2-core CPU: about 4-6 minutes.
#   python finetune_lora.py configs/demo_lora.py --init_from=out/demo/base/ckpt.pt
dataset, data_dir, out_dir = "instruct", "data", "out/demo/lora"
max_seq_len = 192
lora_rank, lora_alpha = 8, 16.0
lora_targets = "wq,wk,wv,wo,w1,w2,w3,tok_embeddings"
batch_size, gradient_accumulation_steps = 16, 1
learning_rate, max_iters, warmup_iters = 5e-3, 1000, 50
eval_interval, eval_iters, log_interval = 500, 5, 50
dtype = "float32"  # not the CPU's bf16 autocast: it rounds away the adapters' first small updates
compile = False
