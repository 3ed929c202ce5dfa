"""The docs match the code: every Python block of docs/*.md runs (on a tiny model, the Hub replaced by a
recorder), and docs/cli.md names exactly the options the `hf-ptq` parser has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import save_tiny_llama_with_tokenizer
from test_hub import hub  # noqa: F401  (the Hub replaced by a recorder)

from hf_ptq.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"
SKIP = "<!-- doc-test: skip"
PROSE = (
    "The ferry left the island at dawn. Fishermen mended nets on the pier while the baker carried bread to the "
    "café, and children ran along the sea wall to watch the boats come in. By noon the market was full of voices, "
    "and the smell of grilled fish drifted over the square. "
)


def code_blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```language block of `page` not preceded by a doc-test skip marker."""
    blocks, lines = [], page.read_text().splitlines()
    for match in re.finditer(rf"```{language}\n(.*?)```", page.read_text(), re.S):
        line = page.read_text()[: match.start()].count("\n")
        if line > 0 and lines[line - 1].startswith(SKIP):
            continue
        blocks.append((line + 1, match.group(1)))
    return blocks


PAGES = sorted(p.name for p in DOCS.glob("*.md") if code_blocks(p, "python"))
# what in a tested block needs which optional extra
NEEDS = {
    r'method="(nf4|fp4|llm_int8)"': "bnb",
    r'method="hqq"': "hqq",
    r"\b(from|import) peft\b": "finetune",
    r'format="gguf"': "gguf",
    r"\bimport datasets\b": "datasets",
}


def page_extras(page: str) -> list[str]:
    """The extras the tested Python blocks of `page` need."""
    code = "\n".join(block for _, block in code_blocks(DOCS / page, "python"))
    return sorted({extra for pattern, extra in NEEDS.items() if re.search(pattern, code)})


@pytest.fixture(scope="module")
def doc_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with hidden size 128 (so group_size 64 and 128 both fit) and SmolLM2's tokenizer."""
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("doc-model"), hidden=128, intermediate=256)


def test_every_page_with_code_is_tested():
    assert {"quickstart.md", "evaluation.md", "gptq.md", "rtn.md", "int8.md"} <= set(PAGES)


def test_pages_name_the_extras_they_need():
    assert page_extras("backends.md") == ["bnb", "finetune", "hqq"] and page_extras("export.md") == ["gguf"]
    assert page_extras("quickstart.md") == []


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.extra(*page_extras(p))) for p in PAGES])
def test_python_blocks_run(page, doc_model_dir, tmp_path, monkeypatch, hub):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(PROSE * 20)
    (tmp_path / "eval.txt").write_text(PROSE * 6)
    namespace = {"model_id": str(doc_model_dir)}
    exec("import hf_ptq\nfrom transformers import AutoModelForCausalLM, AutoTokenizer", namespace)  # docs/README.md
    for line, code in code_blocks(DOCS / page, "python"):
        exec(compile("\n" * (line - 1) + code, str(DOCS / page), "exec"), namespace)


def command_options() -> dict[str, set[str]]:
    commands = build_parser()._subparsers._group_actions[0].choices
    return {
        name: {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        for name, parser in commands.items()
    }


def test_cli_reference_names_every_option_and_only_real_ones():
    text = (DOCS / "cli.md").read_text()
    options = command_options()
    sections = re.split(r"^## `hf-ptq (\w+)", text, flags=re.M)
    documented: set[str] = set()
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        named = set(re.findall(r"`(--[a-z-]+)", body))
        assert named <= options[name] | {"--help"}, f"{name}: documented but not in the parser: {named - options[name]}"
        documented |= named
    assert set(sections[1::2]) == set(options)  # a section per command
    missing = set().union(*options.values()) - documented
    assert not missing, f"options missing from docs/cli.md: {sorted(missing)}"


def test_documented_command_lines_parse():
    parser = build_parser()
    pages = [DOCS / "cli.md", DOCS / "quickstart.md", DOCS.parent / "README.md"]
    lines = [
        line.split("#")[0].strip()
        for page in pages
        for _, block in code_blocks(page, "bash")
        for line in block.splitlines()
        if line.startswith("hf-ptq ")
    ]
    assert len(lines) >= 6
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert callable(args.run), line
