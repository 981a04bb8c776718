# The original project's LoRA run (docs/formats.md, "The original instruct storyteller"),
# for finetune_lora.py: base stories110M,
# adapters on wq, wk, wv, wo, rank 2 as its README says (its code silently used 4), lr 5e-4, 5,000 iters.
#   python finetune_lora.py configs/lora110M.py --init_from=data/stories110M.pt
# Expected hardware/time: one A100/H100, well under an hour; a CPU takes days.
dataset = "instruct"
vocab_source = "llama2"
vocab_size = 32000
lora_rank = 2
lora_alpha = 1.0
lora_dropout = 0.0
lora_targets = "wq,wk,wv,wo"
learning_rate = 5e-4
max_iters = 5000
warmup_iters = 100
batch_size = 32
gradient_accumulation_steps = 4
eval_interval = 250
eval_iters = 50
out_dir = "out/lora110M"
