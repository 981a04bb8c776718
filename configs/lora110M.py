# LoRA on llama2.c's stories110M (Llama 2 vocabulary), for finetune_lora.py on a GPU:
#   python prepare_instruct_data.py --vocab_size=0 --tokenizer=tokenizer.model
#   python finetune_lora.py configs/lora110M.py --init_from=stories110M.pt
# The settings the demo study (docs/finetuning.md) points to: rank 8 on the attention matrices,
# which copy the requested words from the prompt (prepare_instruct_data spells them as a story
# does), plus the token embedding: llama2.c's pretraining never showed EOS, so only an embedding
# adapter can teach the model to stop. 12 x 4 x 8 x (768 + 768) + 8 x (32000 + 768) = 852k
# parameters, 0.8% of the model. Reasoned from the 0.94M demo model, not yet measured at 110M.
# The original project's run is one flag set away:
#   --lora_rank=2 --lora_alpha=1.0 --lora_rslora=False --lora_targets=wq,wk,wv,wo   (docs/formats.md, "The original
#   instruct storyteller": lr 5e-4, 5,000 iterations, as here; add --prompt_encoding=plain when
#   preparing its data to tokenize its prompts as it did)
# Expected hardware/time: one A100/H100, well under an hour; a CPU takes days.
dataset, out_dir = "instruct", "out/lora110M"
vocab_source, vocab_size = "llama2", 32000
lora_rank, lora_alpha, lora_rslora, lora_dropout = 8, 4.0, True, 0.0  # finetune_lora's defaults: scaling 4 / sqrt(8)
lora_targets = "wq,wk,wv,wo,tok_embeddings"
learning_rate, max_iters, warmup_iters = 5e-4, 5000, 100
batch_size, gradient_accumulation_steps = 32, 4
eval_interval, eval_iters = 250, 50
