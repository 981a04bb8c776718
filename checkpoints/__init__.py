"""The one place that reads and writes model checkpoints, one module per format, each holding
its reader and its writer with its name table:

- project.py: this project's checkpoints and llama2.c's `.pt` checkpoints (the same dict layout:
  `model`, `model_args`, `config`, `iter_num`, ...; a `_orig_mod.` prefix from torch.compile is
  dropped), and the original instruct storyteller's (pickled `ModelArgs`, unmerged LoRA
  parametrizations, the LoRA rank read from the tensor shapes);
- adapter.py: this project's LoRA adapter files (`kind: "lora_adapter"`), merged into their base;
- llama2c.py: llama2.c's binary model files, versions 0, 1 and 2 (Q8_0, dequantized on reading);
- huggingface.py: Hugging Face Llama folders (config.json + model.safetensors or
  pytorch_model.bin), wq/wk permuted between Hugging Face's rotate-halves layout and Meta's
  adjacent pairs;
- gguf_file.py: llama GGUF files with float32 or float16 tensors;
- common.py: what they share (Checkpoint, CheckpointError, the weight check, safe torch.load);
- loading.py: load_checkpoint, which tells the format from the file itself, whatever its name.

Every export carries the prompt format (prompts.prompt_format), and each reader takes it back.
Nothing is unpickled beyond tensors and plain containers (`weights_only=True`), so a hostile
file can fail to load but never run code.

    from checkpoints import load_checkpoint, load_model, save_checkpoint
"""
from checkpoints.adapter import base_reference, checkpoint_sha256, find_base_checkpoint
from checkpoints.common import Checkpoint, CheckpointError, check_weights
from checkpoints.loading import find_tokenizer, load_checkpoint, load_model, load_tokenizer_for
from checkpoints.project import model_args_dict, save_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "base_reference", "check_weights", "checkpoint_sha256",
           "find_base_checkpoint", "find_tokenizer", "load_checkpoint", "load_model", "load_tokenizer_for",
           "model_args_dict", "save_checkpoint"]
