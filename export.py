"""Export a checkpoint to the files other Llama tools read, and import theirs.

    python export.py --checkpoint=out/ckpt.pt --format=llama2c-v0 --out=out/model.bin
    python export.py --checkpoint=out/ckpt.pt --format=llama2c-q8 --out=out/model_q8.bin
    python export.py --checkpoint=out/ckpt.pt --format=hf --out=out/hf_model
    python export.py --checkpoint=out/ckpt.pt --format=gguf --out=out/model.gguf
    python export.py --checkpoint=hf_model/ --format=pt --out=out/from_hf.pt

--checkpoint is anything checkpoints.load_checkpoint reads: this project's checkpoints and LoRA
adapters (merged on the way), llama2.c .pt files and .bin files (versions 0, 1, 2), the original
instruct storyteller's checkpoints, and Hugging Face Llama folders. --tokenizer overrides the
sentencepiece .model the checkpoint names or has beside it.

Formats
- llama2c-v0: llama2.c's legacy float32 file, the one its run.c reads: 7-int header, weights,
  then the RoPE cos/sin tables computed as llama2.c's Python computes them.
- llama2c-v1: llama2.c's version 1 (magic "ak42", 256-byte header, float32, no RoPE tables),
  as its export.py --version=1 writes it (its run.c reads version 0, runq.c version 2).
- llama2c-q8: llama2.c's version 2 (Q8_0), read by its runq.c: norms float32, each matmul weight
  as int8 plus one float32 scale per group (scale = max|w| / 127, q = round(w / scale)). The
  group size starts at 64 and halves until it divides both dim and hidden_dim: runq.c also
  quantizes the activations (dim and hidden_dim long) in groups of the same size and silently
  drops a partial last group.
  All three get the tokenizer in llama2.c's tokenizer.bin format beside them, named after the
  .model (tok512.model -> tok512.bin): ./run model.bin -z tok512.bin, and the prompt format
  (instruct or not, and the prompt encoding) in model.bin.json, which llama2.c's header has no
  room for; the loader reads it back.
- hf: a folder transformers.AutoModelForCausalLM / AutoTokenizer load with no other help:
  config.json (LlamaForCausalLM, tie_word_embeddings true, rope_theta 10000), model.safetensors
  (float32; lm_head is not stored, it is tied to embed_tokens), generation_config.json,
  tokenizer.model (the sentencepiece file itself), tokenizer.json, tokenizer_config.json,
  special_tokens_map.json. Hugging Face's RoPE rotates the two HALVES of each head where
  llama2.c rotates ADJACENT pairs, so wq and wk rows are permuted per head
  (checkpoints.huggingface.hf_permute_qk: view (heads, head_dim/2, 2, dim), swap axes 1 and 2; wk with
  n_kv_heads); the forward pass is then the same function. tokenizer.json rebuilds
  sentencepiece's BPE for the tokenizers library: the vocabulary in id order, merges = every
  split of a piece into two pieces ranked by the piece's score, byte fallback, a normalizer
  that adds the "▁" prefix and spells spaces "▁" and, when the .model squeezes and trims runs
  of spaces (llama2.c's trained tokenizers do; Llama 2's does not), first does that too. It
  loads as PreTrainedTokenizerFast: LlamaTokenizer rebuilds its own pipeline without that
  normalizer, and reading tokenizer.model needs protobuf. BOS is added, EOS is not, and "<s>"
  typed in text stays text (split_special_tokens), as with sentencepiece.
- gguf: one file for llama.cpp, written with the gguf package, following llama.cpp's
  convert_hf_to_gguf.py conventions for architecture "llama":
  * tensors token_embd, blk.N.attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
    ffn_gate (w1), ffn_down (w2), ffn_up (w3), output_norm, each ".weight"; no output.weight
    because the classifier is tied (llama.cpp then uses token_embd);
  * all float32 (general.file_type 0), each PyTorch (out, in) matrix written row-major as it is,
    which ggml lists as ne = [in, out];
  * attn_q / attn_k in Meta's layout, which is llama2.c's: NOT permuted (llama.cpp's converter
    undoes Hugging Face's permutation; ggml's normal RoPE rotates adjacent pairs);
  * metadata llama.context_length, embedding_length, block_count, feed_forward_length,
    rope.dimension_count (head_dim), rope.freq_base 10000, attention.head_count,
    attention.head_count_kv, attention.layer_norm_rms_epsilon, vocab_size;
  * vocabulary tokenizer.ggml.model "llama" (sentencepiece): tokens are the pieces verbatim
    (with "▁", bytes as "<0xNN>"), scores, token_type (1 normal, 2 unknown, 3 control, 5 unused,
    6 byte), bos/eos/unknown ids, add_bos_token true, add_eos_token false, add_space_prefix true;
  * the prompt format as JSON under tinystories.prompt_format (also the "prompt_format" key of
    the hf format's config.json).
  GGUF has no field for sentencepiece's squeezing of spaces, so with a tokenizer that squeezes
  them (tok512 and the others llama2.c trains) GGUF readers tokenize text with runs of spaces,
  or leading/trailing ones, differently; ordinary story text is unaffected.
- pt: this project's checkpoint (kind "project", model, model_args, config with vocab_size,
  vocab_source and the tokenizer path when one is found, iter_num 0), e.g. to fine-tune a small
  Llama from the Hugging Face Hub with finetune_lora.py.

An existing output is never replaced without --force (into an existing folder, --format=hf
writes only its own files, whatever else is there stays). Every file is written under a temporary
name and renamed, so a reader never sees half a file, and an export that fails while writing
changes nothing. A new folder appears whole, in one rename; into an existing folder the files are
renamed in one by one, so a reader looking at that moment can find some new beside some old (no
rename replaces some of a folder's files at once and keeps the others).
"""
import argparse
import os
import sys

import cli
from checkpoints import find_tokenizer, load_checkpoint, load_tokenizer_for, save_checkpoint
from checkpoints import gguf_file, huggingface, llama2c, project
from cli import OneLineParser, UsageError, atomic_write, atomic_write_folder, report_error, run_main, write_json
from prompts import PROMPT_FORMAT_KEY

FORMATS = ("llama2c-v0", "llama2c-v1", "llama2c-q8", "hf", "gguf", "pt")
LLAMA2C_WRITERS = {"llama2c-v0": llama2c.write_llama2c_v0, "llama2c-v1": llama2c.write_llama2c_v1,
                   "llama2c-q8": llama2c.write_llama2c_q8}
LLAMA2C_FORMATS = tuple(LLAMA2C_WRITERS)


# ---- command line ----------------------------------------------------------------------------

def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="input: .pt, llama2.c .bin, LoRA adapter, Hugging Face Llama folder")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output file (a folder for --format=hf)")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the checkpoint's own)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (into a folder: only the files the export writes)")
    return p


def check_output(out, fmt, force, inputs=()):
    """cli.check_output's rule: an existing --out only with --force, never an input; into an
    existing folder --format=hf writes its own files and leaves the others there. The llama2.c
    formats also write the prompt-format record beside the .bin."""
    cli.check_output(out, f"--out={out}", force, inputs=inputs, folder=fmt == "hf")
    if fmt in LLAMA2C_FORMATS:
        sidecar = llama2c.llama2c_sidecar_path(out)
        cli.check_output(sidecar, sidecar, force, inputs=inputs)


def export(checkpoint, fmt, out, tokenizer_path=None, force=False) -> str:
    """Run one export; returns a one-line summary. Raises UsageError or CheckpointError."""
    if fmt not in FORMATS:
        raise UsageError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
    check_output(out, fmt, force, inputs=[checkpoint, tokenizer_path])
    ckpt = load_checkpoint(checkpoint)
    args, state, prompt_format = ckpt.model_args, ckpt.state_dict, ckpt.prompt_format
    if fmt == "pt":
        tokenizer_path = find_tokenizer(ckpt, tokenizer_path)
        save_checkpoint(out, project.project_checkpoint(ckpt, tokenizer_path))
        return f"wrote {out} (this project's checkpoint, {ckpt.kind} input)"
    tokenizer = load_tokenizer_for(ckpt, tokenizer_path)
    if fmt in LLAMA2C_FORMATS:
        return export_llama2c(fmt, out, args, state, tokenizer, prompt_format, force)
    if fmt == "hf":
        atomic_write_folder(out, lambda folder: huggingface.write_hf_folder(folder, args, state, tokenizer,
                                                                            prompt_format))
        return f"wrote {out}/ (Hugging Face LlamaForCausalLM)"
    name = os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]
    atomic_write(out, lambda tmp: gguf_file.write_gguf(tmp, args, state, tokenizer, name, prompt_format))
    return f"wrote {out} (GGUF, float32)"


def export_llama2c(fmt, out, args, state, tokenizer, prompt_format, force) -> str:
    """The .bin, its prompt-format sidecar and the tokenizer in llama2.c's format beside them."""
    tokenizer_bin = llama2c.llama2c_tokenizer_path(out, tokenizer.model_path)
    if os.path.abspath(tokenizer_bin) == os.path.abspath(out):
        raise UsageError(f"{out}: is where the tokenizer file goes; name the model differently")
    llama2c.export_llama2c_tokenizer(tokenizer, tokenizer_bin, force)
    sidecar = llama2c.llama2c_sidecar_path(out)

    def write_model_then_sidecar(tmp):
        # the sidecar only once the .bin is whole, and the .bin renamed right after it: a failed
        # write leaves the old pair, never the old model beside the new one's prompt format
        LLAMA2C_WRITERS[fmt](tmp, args, state)
        write_json(sidecar, {PROMPT_FORMAT_KEY: prompt_format}, indent=2)
    atomic_write(out, write_model_then_sidecar)
    return f"wrote {out}, {os.path.basename(sidecar)} (its prompt format) and {tokenizer_bin}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        print(export(args.checkpoint, args.format, args.out, args.tokenizer, args.force))
    except UsageError as exc:
        return report_error(exc)
    except (OSError, ImportError) as exc:  # a full disk, a read-only folder, gguf not installed
        return report_error(f"exporting {args.checkpoint} to {args.out} failed: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
