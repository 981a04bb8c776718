"""The training data as batches: random windows of the pretokenized stories (pretrain) or
one instruction example a row with the prompt masked out of the loss (instruct), the sampler
that draws every iteration's rows, and the fixed rows evaluation scores. train.py and
evaluate.py both read data through here, the way llama2.c keeps its Task out of train.py.

Settings used: dataset, data_dir, vocab_source, vocab_size, max_seq_len (train.py's names).
"""
import glob
import json
import mmap
import os

import numpy as np
import torch

from cli import UsageError
from data_paths import folder_vocab, instruct_dir, pretokenized_dir, tokenizer_model_path
from prompts import PROMPT_FORMAT_KEY, prompt_format, read_prompt_format


def _release_pages(array):
    """Unmap the pages a batch touched (the OS page cache keeps them): a memmap held open for the
    whole run would otherwise count every page it ever read as this process's resident memory."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class ShardedRows:
    """Rows numbered 0..len-1 across several shard files; `locate` maps row numbers to (shard, index)."""

    def __init__(self, folder, sizes):
        self.folder, self.ends = folder, np.cumsum(sizes)
        self.begins = self.ends - np.asarray(sizes)

    def __len__(self):
        return int(self.ends[-1])

    def locate(self, rows):
        shard = np.searchsorted(self.ends, rows, side="right")
        return shard, rows - self.begins[shard]


def check_token_ids(path, tokens, vocab_size):
    """Refuse a shard holding an id the embedding has no row for (data for another tokenizer, or
    a corrupt file) now, in one line, rather than as an index error deep in a training step. One
    vectorized pass a chunk: about a second per GB of tokens, once per run."""
    if vocab_size is None or tokens.size == 0:
        return
    flat, largest = tokens.reshape(-1), 0
    for start in range(0, flat.size, 1 << 24):
        largest = max(largest, int(flat[start:start + (1 << 24)].max()))
    _release_pages(tokens)
    if largest >= vocab_size:
        raise UsageError(f"{path}: holds token id {largest}, but the vocabulary has {vocab_size} ids "
                         f"(data for another tokenizer, or a corrupt shard)")


def open_token_shard(path):
    size = os.path.getsize(path)
    if size % 2:
        raise UsageError(f"{path}: {size} bytes is not a whole number of uint16 tokens (a ragged tail: "
                         f"truncated or not a token shard)")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


class TokenWindows(ShardedRows):
    """Pretraining: windows of seq_len+1 tokens at random offsets of the uint16 shards, as nanoGPT
    draws them (llama2.c cuts each shard into consecutive windows and shuffles those). Each shard
    is memory-mapped once for the run, not once per batch as in nanoGPT."""

    def __init__(self, folder, files, seq_len, vocab_size=None):
        self.shards = [open_token_shard(f) for f in files]
        for f, shard in zip(files, self.shards):
            check_token_ids(f, shard, vocab_size)
        short = [f for f, s in zip(files, self.shards) if len(s) <= seq_len]
        if short:
            raise UsageError(f"{short[0]}: fewer than max_seq_len+1 = {seq_len + 1} tokens")
        self.seq_len = seq_len
        super().__init__(folder, [len(s) - seq_len for s in self.shards])

    def get(self, rows, device):
        shards, starts = self.locate(rows)
        batch = np.stack([self.shards[s][i:i + self.seq_len + 1] for s, i in zip(shards, starts)])
        for s in set(shards.tolist()):
            _release_pages(self.shards[s])
        batch = torch.from_numpy(batch.astype(np.int64))
        return to_device(batch[:, :-1], device), to_device(batch[:, 1:], device)


class InstructRows(ShardedRows):
    """Instruct: one example a row (prompt, BOS, story, EOS, zero padding). Targets are -1 except
    for BOS, story and EOS: the model learns to answer a prompt, not to write prompts."""

    def __init__(self, folder, files, max_len, vocab_size=None):
        self.tokens, self.lengths = [], []
        for f in files:
            tokens, lengths = read_instruct_shard(f, vocab_size)
            self.tokens.append(tokens)
            self.lengths.append(lengths)
        widths = {t.shape[1] for t in self.tokens}
        if len(widths) > 1:
            raise UsageError(f"{folder}: instruct shards of different widths {sorted(widths)} (prepared apart?)")
        self.seq_len = min(self.tokens[0].shape[1] - 1, max_len)
        self.request_weight, self.finder = 1.0, None
        self.hero_weight, self.hero_names = 1.0, {}
        super().__init__(folder, [len(t) for t in self.tokens])

    def get(self, rows, device):
        shards, index = self.locate(rows)
        batch = np.stack([self.tokens[s][i, :self.seq_len + 1] for s, i in zip(shards, index)]).astype(np.int64)
        lengths = np.stack([self.lengths[s][i] for s, i in zip(shards, index)])
        for s in set(shards.tolist()):
            _release_pages(self.tokens[s])
        # positions past the batch's longest example are padding for every row: leave them out
        # (causal attention means the positions kept compute exactly the same loss)
        width = max(1, min(self.seq_len, int(lengths[:, 1].max()) - 1))
        x, y = batch[:, :width], batch[:, 1:width + 1].copy()
        position = np.arange(1, width + 1)  # where each target sits in the row
        y[(position < lengths[:, :1]) | (position >= lengths[:, 1:])] = -1
        x, y = to_device(torch.from_numpy(x), device), to_device(torch.from_numpy(y), device)
        if self.request_weight == 1.0 and self.hero_weight == 1.0:
            return x, y
        return x, y, to_device(torch.from_numpy(self.target_weights(batch[:, :width + 1], lengths)), device)

    def example_lengths(self):
        """Each example's length (prompt, BOS, story, EOS), in row order."""
        return np.concatenate([lengths[:, 1] for lengths in self.lengths]).astype(np.int64)

    def emphasize_requests(self, weight, finder):
        """Weigh the story tokens that carry out the prompt's requests weight times the others in
        the loss: every story spelling of a requested word (the prompt's tokens for it, so
        "climbed" counts where its tokens begin with those of "climb"), and the quotation
        marks of a story whose prompt asks for a dialogue (finder: prompts.RequestFinder). get()
        then returns (x, y, target weights)."""
        self.request_weight, self.finder = float(weight), finder

    def emphasize_hero(self, weight, names):
        """Weigh each later spelling of a story's hero name (the first of `names`, token sequences,
        that the story spells) weight times the others: keeping the hero's name is a copy from
        earlier in the story, as a requested word is a copy from the prompt."""
        self.hero_weight, self.hero_names = float(weight), {}
        for name in names:  # by first token: a story token is checked against the names it can begin
            self.hero_names.setdefault(name[0], []).append(tuple(name))

    def target_weights(self, rows, lengths):
        weights = np.ones((len(rows), rows.shape[1] - 1), dtype=np.float32)
        for weight_row, row, (prompt_len, total) in zip(weights, rows.tolist(), lengths):
            # the story token at row position p is target column p - 1
            story_weights = weight_row[prompt_len:]
            prompt, story = row[:prompt_len], row[prompt_len + 1:min(total, len(row))]
            if self.hero_weight != 1.0:
                self.weigh_hero_repeats(story, story_weights)
            if self.finder is None:
                continue
            words_by_first_token = {}
            for word in self.finder.words(prompt):
                words_by_first_token.setdefault(word[0], []).append(word)
            dialogue = self.finder.asks_for_dialogue(prompt)
            for i, token in enumerate(story):
                if dialogue and token in self.finder.speech:
                    story_weights[i] = self.request_weight
                for word in words_by_first_token.get(token, ()):
                    if tuple(story[i:i + len(word)]) == word:
                        story_weights[i:i + len(word)] = self.request_weight
        return weights

    def weigh_hero_repeats(self, story, story_weights):
        spelled = [(i, name) for i, token in enumerate(story) for name in self.hero_names.get(token, ())
                   if tuple(story[i:i + len(name)]) == name]
        if spelled:
            hero = spelled[0][1]
            for i, name in spelled[1:]:
                if name == hero:
                    story_weights[i:i + len(name)] = self.hero_weight


def load_npy(path, mmap_mode=None):
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as exc:  # numpy's header parser fails in many ways (even tokenize.TokenError) on a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{path}: not a readable .npy array, truncated or corrupt ({reason})") from None


def read_instruct_shard(tokens_path, vocab_size=None):
    """(tokens, lengths) of one instruct shard, each refused in one line naming its file when its
    dtype, shape or values cannot be what prepare_instruct_data.py wrote: integer tokens (n, L)
    with ids below vocab_size, integer lengths (n, 2) with 0 <= prompt_len < total_len <= L."""
    lengths_path = tokens_path.replace(".tokens.npy", ".lengths.npy")
    tokens = load_npy(tokens_path, mmap_mode="r")
    if tokens.dtype.kind not in "ui" or tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UsageError(f"{tokens_path}: {tokens.dtype} array of shape {tokens.shape}, expected integer "
                         f"token ids of shape (examples, width >= 2)")
    lengths = load_npy(lengths_path)
    if lengths.dtype.kind not in "ui" or lengths.shape != (len(tokens), 2):
        raise UsageError(f"{lengths_path}: {lengths.dtype} array of shape {lengths.shape}, expected "
                         f"integers of shape ({len(tokens)}, 2) to match {os.path.basename(tokens_path)}")
    prompt_len, total = lengths[:, 0].astype(np.int64), lengths[:, 1].astype(np.int64)
    bad = np.flatnonzero((prompt_len < 0) | (prompt_len >= total) | (total > tokens.shape[1]))
    if bad.size:
        raise UsageError(f"{lengths_path}: row {bad[0]} has lengths {lengths[bad[0]].tolist()}, outside "
                         f"0 <= prompt < total <= {tokens.shape[1]}")
    if tokens.dtype.kind == "i" and tokens.size and int(tokens.min()) < 0:
        raise UsageError(f"{tokens_path}: holds negative token ids")
    check_token_ids(tokens_path, tokens, vocab_size)
    return tokens, lengths


def to_device(tensor, device):
    """Pinned memory and a non-blocking copy on CUDA: the next batch loads while this one trains."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def data_folder(cfg):
    """tok{N}/ (pretrain) or instruct{N}/ under data_dir, for the run's vocabulary."""
    n = folder_vocab(cfg["vocab_size"], cfg["vocab_source"])
    return (pretokenized_dir if cfg["dataset"] == "pretrain" else instruct_dir)(cfg["data_dir"], n)


def open_dataset(cfg, split, model_max_len):
    folder = data_folder(cfg)
    pattern = "data*.bin" if cfg["dataset"] == "pretrain" else "data*.tokens.npy"
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    files = files[:1] if split == "val" else files[1:]
    if not files:
        n = folder_vocab(cfg["vocab_size"], cfg["vocab_source"])
        step = "tinystories.py pretokenize" if cfg["dataset"] == "pretrain" else "prepare_instruct_data.py"
        raise UsageError(f"{folder}: no {split} shards {pattern} (data00 is validation, data01... training); "
                         f"run `python {step} --vocab_size={n} --data_dir={cfg['data_dir']}` first")
    if cfg["dataset"] == "pretrain":
        return TokenWindows(folder, files, min(cfg["max_seq_len"], model_max_len), cfg["vocab_size"])
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise UsageError(f"{folder}: no meta.json, so prepare_instruct_data.py did not finish there; run it again")
    rows = InstructRows(folder, files, min(cfg["max_seq_len"], model_max_len), cfg["vocab_size"])
    if len(rows) == 0:
        raise UsageError(f"{folder}: the {split} shards hold no examples; run prepare_instruct_data.py again "
                         f"with a larger --max_seq_len")
    shortest_prompt = min(int(lengths[:, 0].min()) for lengths in rows.lengths if len(lengths))
    if shortest_prompt > rows.seq_len:  # every target would be masked: a nan loss, not a lesson
        raise UsageError(f"max_seq_len={cfg['max_seq_len']}: a window of {rows.seq_len} tokens (model {model_max_len}) "
                         f"is shorter than every prompt in {folder} (the shortest takes {shortest_prompt}); "
                         f"raise max_seq_len")
    if rows.seq_len < rows.tokens[0].shape[1] - 1 and split == "train":
        print(f"note: instruct rows hold {rows.tokens[0].shape[1] - 1} positions; cropped to {rows.seq_len} "
              f"(max_seq_len {cfg['max_seq_len']}, model {model_max_len}): long stories lose their end")
    return rows


def data_meta(cfg) -> dict:
    """The instruct data's meta.json (prepare_instruct_data); {} for token shards."""
    meta = os.path.join(data_folder(cfg), "meta.json")
    if not os.path.isfile(meta):
        return {}
    with open(meta) as f:
        return json.load(f)


def default_tokenizer(cfg):
    meta = data_meta(cfg)
    if meta:
        return meta.get("tokenizer", "")
    return "" if cfg["vocab_source"] == "llama2" else tokenizer_model_path(cfg["data_dir"], cfg["vocab_size"])


def data_prompt_format(cfg) -> dict:
    """How a model trained on this data reads its prompt (prompts.prompt_format): a model must be
    prompted as its data was, so checkpoints record it. Instruct data written before meta.json
    held the record names its encoding alone, or (older still) nothing: plain."""
    if cfg["dataset"] != "instruct":
        return prompt_format(False)
    meta = data_meta(cfg)
    if PROMPT_FORMAT_KEY in meta:
        return read_prompt_format(meta[PROMPT_FORMAT_KEY])
    return prompt_format(True, meta.get("prompt_encoding", "plain"))


class BatchSampler:
    """Every iteration's rows come from one generator, seeded alike in every process; each process
    takes its own slice. So the global batch is the same for 1 or N processes, and the generator's
    state is the loader's whole position (saved in checkpoints for exact resume)."""

    def __init__(self, data, batch_size, accum_steps, world, rank, seed, group_by_length=False):
        self.data, self.shape, self.rank = data, (world, accum_steps, batch_size), rank
        self.generator = torch.Generator().manual_seed(seed)
        self.by_length, self.window = None, max(8 * batch_size, len(data) // 64)
        if group_by_length and len(data) > self.window:  # smaller data: uniform draws, as without it
            self.by_length = torch.from_numpy(np.argsort(data.example_lengths(), kind="stable"))

    def iteration(self, device):
        if self.by_length is not None:
            rows = self.similar_lengths()
        else:
            rows = torch.randint(len(self.data), self.shape, generator=self.generator, device="cpu")
        for micro in range(self.shape[1]):
            yield self.data.get(rows[self.rank, micro].numpy(), device)

    def similar_lengths(self):
        """Each micro-batch's rows drawn without replacement from one run of `window` examples
        adjacent in length order, the run starting anywhere (wrapping around): a batch is cut to
        its longest row, so this removes most padding, and every example stays equally likely."""
        world, accum, batch = self.shape
        start = torch.randint(len(self.data), (world, accum, 1), generator=self.generator)
        offset = torch.rand((world, accum, self.window), generator=self.generator).argsort(-1)[..., :batch]
        return self.by_length[(start + offset) % len(self.data)]

    def get_state(self):
        return self.generator.get_state()

    def set_state(self, state):
        self.generator.set_state(state)


def fixed_batches(data, n_batches, batch_size, seed):
    """The rows evaluation uses every time, so successive losses are comparable."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(len(data), (batch_size,), generator=generator, device="cpu").numpy() for _ in range(n_batches)]
