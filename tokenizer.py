"""Sentencepiece tokenizer wrapper, plus export to llama2.c's tokenizer.bin format.

    python tokenizer.py --tokenizer=data/tok4096.model     # writes data/tok4096.bin
"""
import os
import struct
import sys
from typing import List

from sentencepiece import SentencePieceProcessor

from cli import OneLineParser, UsageError, atomic_write, check_output, report_error, run_main


class TokenizerError(UsageError):
    """A tokenizer file that is missing or is not a sentencepiece model."""


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise TokenizerError(f"tokenizer {model_path}: no such file (expected a sentencepiece .model)")
        self.model_path = model_path
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as exc:  # sentencepiece raises bare OSError/RuntimeError
            raise TokenizerError(f"tokenizer {model_path}: not a sentencepiece model ({exc})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def llama2c_pieces(self):
        """(bytes, score) per id, as llama2.c's run.c expects them."""
        for i in range(self.vocab_size):
            if i == self.bos_id:
                piece = "\n<s>\n"
            elif i == self.eos_id:
                piece = "\n</s>\n"
            else:
                piece = self.sp.id_to_piece(i).replace("\u2581", " ")
            yield piece.encode("utf-8"), self.sp.get_score(i)

    def export(self, path: str):
        """Write llama2.c's tokenizer.bin: max token length, then (score, length, bytes) per id."""
        pieces = list(self.llama2c_pieces())
        body = bytearray(struct.pack("<I", max(len(b) for b, _ in pieces)))
        for data, score in pieces:
            body += struct.pack("<fI", score, len(data)) + data
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(body)
        atomic_write(path, write)


def is_tokenizer_bin(path) -> bool:
    """Whether path is a llama2.c tokenizer.bin (an earlier export, which --out may replace):
    a max length, then (score, length, bytes) records that end exactly at the end of the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    pos = 4
    while len(data) >= pos + 8:
        pos += 8 + struct.unpack_from("<fI", data, pos)[1]
    return len(data) > 4 and pos == len(data)


def main(argv=None):
    parser = OneLineParser(description="Export a sentencepiece model to llama2.c's tokenizer.bin")
    parser.add_argument("--tokenizer", required=True, help="path to a sentencepiece .model")
    parser.add_argument("--out", help="output path (default: the model path with .bin)")
    parser.add_argument("--force", action="store_true", help="let --out replace a file that is not a tokenizer.bin")
    args = parser.parse_args(argv)
    out = args.out or os.path.splitext(args.tokenizer)[0] + ".bin"
    try:
        tok = Tokenizer(args.tokenizer)
        check_output(out, f"--out={out}", args.force, ours=is_tokenizer_bin, inputs=[args.tokenizer])
    except UsageError as exc:
        return report_error(exc)
    tok.export(out)
    print(f"wrote {out} ({tok.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
