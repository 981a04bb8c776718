# make demo : the whole pipeline on the offline demo corpus, outputs in out/demo/
# make demo-finetune : a base pretrained on the demo's plain stories, LoRA-tuned and scored (out/demo/)
# make test : the test suite
# Both create or reuse .venv. Pin torch with e.g. `make test TORCH=torch==2.13.0`.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH ?= torch>=2.13
TEST_PACKAGES ?= pytest>=7 transformers>=4.40 accelerate hypothesis>=6 openai>=1.30 selenium>=4.11 lm-eval[api]==0.4.13
PYTEST_ARGS ?= -q

.PHONY: demo demo-pipeline demo-data demo-finetune demo-finetune-pipeline test venv

$(VENV)/.deps: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)" -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(foreach p,$(TEST_PACKAGES),"$(p)")
	touch $@

venv: $(VENV)/.deps

test: $(VENV)/.test-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests

# ---- the quickstart: offline demo corpus -> tokenizer -> instruct data -> model -> story, score
DEMO_DIR ?= out/demo
DEMO_DATA = $(DEMO_DIR)/data
DEMO_VOCAB ?= 1024
DEMO_SHARDS ?= 6
DEMO_STORIES ?= 5000
DEMO_SEQ ?= 192
DEMO_TRAIN ?=
DEMO_PROMPTS ?= 100
DEMO_STORY ?= --verb=climb --noun=ring --adjective=messy --features=dialogue

demo: $(VENV)/.deps
	@$(MAKE) --no-print-directory demo-pipeline

demo-data:
	$(PY) tinystories.py make_demo --data_dir=$(DEMO_DATA) --num_shards=$(DEMO_SHARDS) --stories_per_shard=$(DEMO_STORIES)
	$(PY) tinystories.py train_vocab --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB) --include_prompts
	$(PY) prepare_instruct_data.py --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB) --max_seq_len=$(DEMO_SEQ)

demo-pipeline: demo-data
	$(PY) train.py configs/demo_instruct.py --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB) \
		--max_seq_len=$(DEMO_SEQ) --out_dir=$(DEMO_DIR)/instruct $(DEMO_TRAIN)
	@echo "== a story for: $(DEMO_STORY)"
	$(PY) generate.py --model_path=$(DEMO_DIR)/instruct/ckpt.pt $(DEMO_STORY)
	$(PY) evaluate.py --model_path=$(DEMO_DIR)/instruct/ckpt.pt --data=$(DEMO_DATA)/instruct$(DEMO_VOCAB) \
		--num_prompts=$(DEMO_PROMPTS) --held_out_from=$(DEMO_DATA) --report=$(DEMO_DIR)/eval.json
	@echo "== serve it in a browser and behind an OpenAI-compatible API: $(PY) serve.py --model_path=$(DEMO_DIR)/instruct/ckpt.pt"

# ---- a base pretrained on the plain demo stories, LoRA-tuned into an instruct model, scored
DEMO_FT_TRAIN ?=
# the base alone and the LoRA alone. The longer recipe of docs/finetuning.md ("Results", row C: 97-100% on
# every seed tried, against 91-100% for the shipped one; about 13 minutes on the Zen 3 instead of 10), at
# the single learning rate it was measured with:
#   make demo-finetune DEMO_BASE_TRAIN="--max_iters=800 --learning_rate=3e-3" \
#     DEMO_LORA_TRAIN="--max_iters=1500 --learning_rate=1e-2 --lora_b_lr_ratio=1"
DEMO_BASE_TRAIN ?=
DEMO_LORA_TRAIN ?=

demo-finetune: $(VENV)/.deps
	@$(MAKE) --no-print-directory demo-finetune-pipeline

demo-finetune-pipeline: demo-data
	$(PY) tinystories.py pretokenize --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB)
	$(PY) train.py configs/demo_base.py --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_DIR)/base $(DEMO_FT_TRAIN) $(DEMO_BASE_TRAIN)
	$(PY) finetune_lora.py configs/demo_lora.py --init_from=$(DEMO_DIR)/base/ckpt.pt --data_dir=$(DEMO_DATA) \
		--out_dir=$(DEMO_DIR)/lora $(DEMO_FT_TRAIN) $(DEMO_LORA_TRAIN)
	$(PY) evaluate.py --compare $(DEMO_DIR)/base/ckpt.pt $(DEMO_DIR)/lora/ckpt.pt --data=$(DEMO_DATA)/instruct$(DEMO_VOCAB) --max_tokens=200000 \
		--num_prompts=$(DEMO_PROMPTS) --held_out_from=$(DEMO_DATA) --report=$(DEMO_DIR)/eval_finetune.json
