# make demo : the whole pipeline on the offline demo corpus, outputs in out/demo/
# make demo-finetune : a base pretrained on the demo's plain stories, LoRA-tuned and scored (out/demo/)
# make test : the test suite
# Both create or reuse .venv. Pin torch with e.g. `make test TORCH=torch==2.13.0`.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH ?= torch>=2.13
TEST_PACKAGES ?= pytest>=7 transformers>=4.40 accelerate hypothesis>=6 openai>=1.30 selenium>=4.11 jinja2>=3.1 lm-eval[api]==0.4.13
PYTEST_ARGS ?= -q

# Which PyTorch build: pip's own choice on Linux is the CUDA build, some 5 GB of CUDA libraries that
# a machine without an NVIDIA GPU cannot use. So where nvidia-smi is absent the default TORCH comes
# from PyTorch's CPU wheel index. A TORCH= of your own goes to pip as it is, from pip's configured
# indexes (CI pins the CPU build on its disk that way); TORCH_INDEX=URL names an index for it, and
# TORCH_INDEX= (empty) takes pip's default build.
TORCH_CPU_INDEX = https://download.pytorch.org/whl/cpu
NVIDIA_SMI := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_INDEX ?= $(if $(NVIDIA_SMI)$(filter-out default file,$(origin TORCH)),,$(TORCH_CPU_INDEX))
TORCH_NOTE = $(if $(TORCH_INDEX),$(if $(NVIDIA_SMI),,no NVIDIA GPU (nvidia-smi not found): )installing PyTorch from $(TORCH_INDEX),installing $(TORCH) from pip's configured indexes$(if $(NVIDIA_SMI), (NVIDIA GPU: $(NVIDIA_SMI))))

.PHONY: demo demo-pipeline demo-data demo-finetune demo-finetune-pipeline test venv FORCE

$(VENV)/.deps: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "== $(TORCH_NOTE)"
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)"$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX))
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(foreach p,$(TEST_PACKAGES),"$(p)")
	touch $@

venv: $(VENV)/.deps

test: $(VENV)/.test-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests

# make remakes a file when one of its prerequisites is newer. A setting is not a file, so each
# step's settings are kept in a small file, rewritten only when they change: a step runs again
# when its inputs or its settings changed, and is skipped otherwise. A step's .done file is
# touched once it succeeded, so a step that failed or was stopped runs again.
define settings_file
@mkdir -p $(@D)
@printf '%s\n' '$(1)' > $@.new
@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi
endef

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

# Each step below is a file: make runs a step only when an input or a setting changed, so a second
# `make demo` skips the data and tokenizer steps. A new DEMO_TRAIN trains the model again (--force
# replaces only the run's own files in $(DEMO_DIR)/instruct); DEMO_TRAIN="--init_from=resume
# --max_iters=1300" continues the last run instead.
CORPUS_DONE = $(DEMO_DATA)/.corpus.done
TOKENIZER = $(DEMO_DATA)/tok$(DEMO_VOCAB).model
INSTRUCT_DONE = $(DEMO_DATA)/instruct$(DEMO_VOCAB)/.done
INSTRUCT_MODEL = $(DEMO_DIR)/instruct/.done

demo: $(VENV)/.deps
	@$(MAKE) --no-print-directory demo-pipeline

$(DEMO_DATA)/.corpus.settings: FORCE
	$(call settings_file,$(DEMO_SHARDS) shards of $(DEMO_STORIES) stories)

$(CORPUS_DONE): $(DEMO_DATA)/.corpus.settings demo_corpus.py
	$(PY) tinystories.py make_demo --data_dir=$(DEMO_DATA) --num_shards=$(DEMO_SHARDS) --stories_per_shard=$(DEMO_STORIES)
	touch $@

$(TOKENIZER): $(CORPUS_DONE)
	$(PY) tinystories.py train_vocab --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB) --include_prompts

$(DEMO_DATA)/instruct$(DEMO_VOCAB).settings: FORCE
	$(call settings_file,--max_seq_len=$(DEMO_SEQ))

$(INSTRUCT_DONE): $(TOKENIZER) $(DEMO_DATA)/instruct$(DEMO_VOCAB).settings prompts.py
	$(PY) prepare_instruct_data.py --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB) --max_seq_len=$(DEMO_SEQ)
	touch $@

demo-data: $(INSTRUCT_DONE)

$(DEMO_DIR)/instruct.settings: FORCE
	$(call settings_file,--vocab_size=$(DEMO_VOCAB) --max_seq_len=$(DEMO_SEQ) $(DEMO_TRAIN))

$(INSTRUCT_MODEL): $(INSTRUCT_DONE) $(DEMO_DIR)/instruct.settings configs/demo_instruct.py
	$(PY) train.py configs/demo_instruct.py --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB) \
		--max_seq_len=$(DEMO_SEQ) --out_dir=$(DEMO_DIR)/instruct --force $(DEMO_TRAIN)
	touch $@

demo-pipeline: $(INSTRUCT_MODEL)
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

PRETOKENIZED_DONE = $(DEMO_DATA)/tok$(DEMO_VOCAB)/.done
BASE_MODEL = $(DEMO_DIR)/base/.done
LORA_MODEL = $(DEMO_DIR)/lora/.done

$(PRETOKENIZED_DONE): $(TOKENIZER)
	$(PY) tinystories.py pretokenize --data_dir=$(DEMO_DATA) --vocab_size=$(DEMO_VOCAB)
	touch $@

$(DEMO_DIR)/base.settings: FORCE
	$(call settings_file,$(DEMO_FT_TRAIN) $(DEMO_BASE_TRAIN))

$(BASE_MODEL): $(PRETOKENIZED_DONE) $(DEMO_DIR)/base.settings configs/demo_base.py
	$(PY) train.py configs/demo_base.py --data_dir=$(DEMO_DATA) --out_dir=$(DEMO_DIR)/base --force $(DEMO_FT_TRAIN) $(DEMO_BASE_TRAIN)
	touch $@

$(DEMO_DIR)/lora.settings: FORCE
	$(call settings_file,$(DEMO_FT_TRAIN) $(DEMO_LORA_TRAIN))

$(LORA_MODEL): $(BASE_MODEL) $(INSTRUCT_DONE) $(DEMO_DIR)/lora.settings configs/demo_lora.py
	$(PY) finetune_lora.py configs/demo_lora.py --init_from=$(DEMO_DIR)/base/ckpt.pt --data_dir=$(DEMO_DATA) \
		--out_dir=$(DEMO_DIR)/lora --force $(DEMO_FT_TRAIN) $(DEMO_LORA_TRAIN)
	touch $@

demo-finetune-pipeline: $(LORA_MODEL)
	$(PY) evaluate.py --compare $(DEMO_DIR)/base/ckpt.pt $(DEMO_DIR)/lora/ckpt.pt --data=$(DEMO_DATA)/instruct$(DEMO_VOCAB) --max_tokens=200000 \
		--num_prompts=$(DEMO_PROMPTS) --held_out_from=$(DEMO_DATA) --report=$(DEMO_DIR)/eval_finetune.json
