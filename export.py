"""Export a checkpoint to the files other Llama tools read, and import theirs.

    python export.py --checkpoint=out/demo/instruct/ckpt.pt --format=gguf --out=model.gguf
    python export.py --checkpoint=hf_model/ --format=pt --out=from_hf.pt

Formats (docs/formats.md, "Exports", has each file's layout):
  llama2c-v0  llama2.c's float32 .bin, read by its run.c
  llama2c-v1  llama2.c's version 1 .bin (header, float32, no RoPE tables)
  llama2c-q8  llama2.c's version 2 (Q8_0) .bin, read by its runq.c
              (all three: tokenizer.bin and the prompt format, model.bin.json, beside it)
  hf          a folder transformers' AutoModelForCausalLM and AutoTokenizer load
  gguf        one file for llama.cpp (float32); an instruct model's chat template inside
  pt          this project's checkpoint, e.g. from a small Hugging Face Llama

Every file is written under a temporary name and renamed: a failed export changes nothing.
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
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="what to export: any file or folder the loader reads (.pt, LoRA adapter, "
                        "llama2.c .bin, Hugging Face folder, GGUF)")
    p.add_argument("--format", required=True, metavar="FORMAT", help="one of the formats above")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (a folder for --format=hf)")
    p.add_argument("--tokenizer", metavar="PATH", help="sentencepiece .model (default: the checkpoint's own)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (default: refuse; into a folder only the export's own files)")
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
