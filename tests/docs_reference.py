"""Expected values read from ../shared/docs/formats.md at test time, so that the tests check
the code against the published facts rather than against numbers copied from the code."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS_MD = os.path.join(ROOT, "..", "shared", "docs", "formats.md")


def formats_section(number: int) -> str:
    """The text of '## {number}. ...' in formats.md; skips the test where the docs are absent."""
    if not os.path.isfile(FORMATS_MD):
        pytest.skip("../shared/docs/formats.md (the reference facts) is not present beside this checkout")
    with open(FORMATS_MD, encoding="utf-8") as f:
        text = f.read()
    found = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, flags=re.S | re.M)
    assert found, f"formats.md has no section {number}"
    return found.group(0)


GREEDY_STORY = os.path.join(ROOT, "tests", "data", "stories260K_greedy.txt")


def greedy_story() -> str:
    """stories260K's greedy 200 tokens from a lone BOS: llama2.c's published expectation, shipped
    in tests/data (a fresh clone has no ../shared); where formats.md is present, section 9's code
    block, which must say the same."""
    with open(GREEDY_STORY, encoding="utf-8") as f:
        shipped = f.read().removesuffix("\n")
    if os.path.isfile(FORMATS_MD):
        block = re.search(r"^```\n(.*?)\n```", formats_section(9), flags=re.S | re.M)
        assert block, "formats.md section 9 has no code block"
        assert block.group(1) == shipped, "tests/data/stories260K_greedy.txt differs from formats.md section 9"
    return shipped


def readme_prompt(verb: str, noun: str, adjective: str) -> str:
    """Section 7's README prompt template filled in (the doc wraps it over several lines)."""
    found = re.search(r"README promises prompts of the form: `(.*?)`", formats_section(7), flags=re.S)
    assert found, "formats.md section 7 has no README prompt"
    template = re.sub(r"\s*\n\s*", " ", found.group(1))
    return template.replace("{verb}", verb).replace("{noun}", noun).replace("{adj}", adjective)


def param_counts() -> dict:
    """Section 1's published parameter counts, e.g. {'260K': 260032, '15M': 15191712, ...}."""
    line = re.search(r"Parameter counts.*?(?=\n\n|\n\|)", formats_section(1), flags=re.S).group(0)
    return {name: int(count.replace(",", ""))
            for name, count in re.findall(r"(\d+[KM]) config ([\d,]+)", line)}


def model_table() -> dict:
    """Section 1's table: {'stories15M': {'dim': 288, 'n_layers': 6, ...}, ...}."""
    rows = {}
    for line in formats_section(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("stories"):
            dim, n_layers, n_heads, n_kv_heads, vocab, multiple_of, max_seq_len = (
                int(c.split()[0]) for c in cells[1:8])
            rows[cells[0]] = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=vocab, multiple_of=multiple_of, max_seq_len=max_seq_len)
    return rows


def hidden_dim_examples() -> list:
    """Section 1's hidden_dim rule examples: [(dim, multiple_of, hidden_dim), ...]."""
    return [tuple(map(int, m)) for m in
            re.findall(r"dim (\d+)/mult (\d+) -> (\d+)", formats_section(1))]
