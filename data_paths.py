"""Where each stage of the pipeline keeps its files under --data_dir (docs/formats.md, "Data
folder"), so that the stage writing a folder and the stages reading it can never disagree:

    TinyStories_all_data.tar.gz         the downloaded archive
    TinyStories_all_data/dataNN.json    the story shards (downloaded, or tinystories.py make_demo)
    tok{N}.model, tok{N}.bin            tokenizer of N pieces (train_vocab) and its llama2.c export
    tok{N}/dataNN.bin                   pretraining tokens (pretokenize)
    instruct{N}/dataNN.tokens.npy ...   instruction examples (prepare_instruct_data.py)

N is 0 for data tokenized with Llama 2's own 32,000-piece tokenizer (vocab_source "llama2",
llama2.c's naming); any other vocabulary is "custom" and its folders carry its size.
"""
import os

ARCHIVE_NAME = "TinyStories_all_data.tar.gz"
SHARDS_DIRNAME = "TinyStories_all_data"
LLAMA2_VOCAB_SIZE = 32000


def vocab_source(vocab_size: int) -> str:
    """llama2.c's name for a vocabulary: "llama2" (Meta's tokenizer) or "custom"."""
    return "llama2" if vocab_size == LLAMA2_VOCAB_SIZE else "custom"


def folder_vocab(vocab_size: int, source: str = None) -> int:
    """The N in tok{N}/ and instruct{N}/: 0 for the Llama 2 vocabulary."""
    return 0 if (source or vocab_source(vocab_size)) == "llama2" else vocab_size


def shards_dir(data_dir: str) -> str:
    return os.path.join(data_dir, SHARDS_DIRNAME)


def tokenizer_model_path(data_dir: str, vocab_size: int) -> str:
    return os.path.join(data_dir, f"tok{vocab_size}.model")


def tokenizer_file_name(vocab_size: int) -> str:
    """What a model's tokenizer is called: tokenizer.model (Llama 2's) or tok{N}.model."""
    return "tokenizer.model" if vocab_source(vocab_size) == "llama2" else f"tok{vocab_size}.model"


def pretokenized_dir(data_dir: str, n: int) -> str:
    return os.path.join(data_dir, f"tok{n}")


def instruct_dir(data_dir: str, n: int) -> str:
    return os.path.join(data_dir, f"instruct{n}")
