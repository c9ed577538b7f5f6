"""The README and docs/*.md hold together: every relative link and #anchor resolves, and every
``speccascade ...`` / ``train-deferral ...`` command they show parses with the package's CLI parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
COMMAND = re.compile(r"^(?:\$\s+)?(speccascade|train-deferral)\s")
# Commands shown in the pages that do not parse on purpose (a placeholder stands for a real value, or
# the line is a synopsis); each is listed here, so that a skip is visible. Everything else must parse.
SKIPPED = {
    "speccascade COMMAND --help",  # COMMAND stands for any command's name
    # results.md quotes the settings of past benches in its prose, without their --out:
    "speccascade bench --models smollm2-135m-arithmetic --batch-sizes 1 --block-size 5 --prompts 8 "
    "--max-new-tokens 80 --repeats 2 --rules gain:0.2297,learned:DIR@0.2482,tokenv3:0.5,diff:0.2244",
    # ... stands for the settings of the evaluation quoted just before it
    "speccascade evaluate ... --bonus target --rules tokenv3:0.5,learned:DIR@0.2482",
    # three benches in one line: [--drafter-vocab arithmetic] is given in two of them, G is the block size
    "speccascade bench --models smollm2-135m-arithmetic [--drafter-vocab arithmetic] --batch-sizes 1 "
    "--block-size G --prompts 8 --max-new-tokens 80 --repeats 2 --bonus target "
    "--rules tokenv3:0.5,learned:DIR@0.2482,gain:0.2297",
    # plan-worked.md's restarted run: the rules are read from the choices file by a shell function
    """speccascade evaluate --config configs/eval/worked-test.yaml --rules "$(choice "['test_rules']")" """
    "--out runs/worked/eval/test --resume",
    """speccascade evaluate --config configs/eval/worked-test.yaml --limit 256 --rules "$(choice "['secondary_rules']")" """
    "--out runs/worked/eval/secondary --resume",
    "speccascade bench --models smollm2-135m-worked --task worked-arithmetic --prompts 64 --batch-sizes 1 "
    '--max-new-tokens 176 --no-transformers --rules "$RULE,$HEAD" --out runs/worked/bench',
}


def _blocks(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(lines outside code blocks, [(fence info string or 'indented', line)] inside code blocks)."""
    prose, code, fence = [], [], None
    previous_blank, indented = True, False
    for line in text.splitlines():
        if fence is not None:
            if FENCE.match(line.strip()):
                fence = None
            else:
                code.append((fence, line))
            continue
        if FENCE.match(line.strip()):
            fence = line.strip()[3:].strip() or "plain"
            continue
        if line.startswith("    ") and line.strip() and (previous_blank or indented):
            code.append(("indented", line[4:]))
            previous_blank, indented = False, True
            continue
        if not line.strip() and indented:
            previous_blank = True
            continue
        indented = False
        prose.append(line)
        previous_blank = not line.strip()
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation other than hyphens and
    underscores removed, spaces turned into hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[*]", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in ``page``; a repeated slug gets -1, -2, ... as on GitHub."""
    prose, _ = _blocks(page.read_text())
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    prose, _ = _blocks(page.read_text())
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose)
    return LINK.findall(text)


def test_slug_follows_github():
    assert slug("Output directories, resuming and the lock") == "output-directories-resuming-and-the-lock"
    assert slug("What `make demo` prints") == "what-make-demo-prints"
    assert slug("W&B: groups and lineage") == "wb-groups-and-lineage"
    assert slug("Issue 12's goals") == "issue-12s-goals"
    assert slug("1. Notation and numerical conventions") == "1-notation-and-numerical-conventions"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def shown_commands() -> list[tuple[str, str]]:
    """(page name, command) for every command line in a code block: backslash continuations joined,
    ``# comments`` and ``$ `` prompts stripped; ```text blocks hold Python-like text, not commands."""
    found = []
    for page in PAGES:
        _, code = _blocks(page.read_text())
        joined, pending = [], ""
        for fence, line in code:
            if fence == "text" or fence.startswith("python"):
                continue
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1].rstrip()
                continue
            joined.append(line)
        for line in joined:
            stripped = line.strip()
            if COMMAND.match(stripped):
                stripped = re.sub(r"^\$\s+", "", stripped)
                found.append((page.name, re.sub(r"\s+#.*$", "", stripped).strip()))
        prose, _ = _blocks(page.read_text())  # commands with options quoted in the text: `speccascade x --y z`
        for span in re.findall(r"`([^`]+)`", " ".join(prose)):
            if COMMAND.match(span + " ") and " -" in span:
                found.append((page.name, " ".join(span.split())))
    return found


COMMANDS = shown_commands()


def test_pages_show_commands():
    assert len(COMMANDS) >= 20 and any(page == "README.md" for page, _ in COMMANDS)
    stale = SKIPPED - {command for _, command in COMMANDS}
    assert not stale, f"skipped commands no longer in the pages (drop them from SKIPPED): {sorted(stale)}"


@pytest.fixture(scope="module")
def parser():
    from speccascade.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_shown_command_parses(page, command, parser, monkeypatch):
    if command in SKIPPED:
        pytest.skip(f"listed in SKIPPED: {command}")
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository root
    words = shlex.split(command)
    if words[0] == "speccascade":
        words = words[1:]
    words = [w for w in words if w not in ("-v", "--verbose")]
    if "--version" in words or "--help" in words:  # print and exit 0
        with pytest.raises(SystemExit) as done:
            parser.parse_args(words)
        assert not done.value.code
        return
    try:
        cfg = parser.parse_args(words)
    except Exception as err:  # jsonargparse's ArgumentError and its kin
        pytest.fail(f"{page}: `{command}` does not parse: {' '.join(str(err).split())[:300]}", pytrace=False)
    assert cfg.command == words[0]


# --rules values that are not rules.parse's: evaluate's baselines, and heads (their directory is not in the repository)
NOT_RULES = ("target", "drafter", "sequential", "exact", "learned", "...")


def test_rules_in_shown_commands_parse():
    """Every rule spelled in a shown command's --rules/--rule is one that rules.parse accepts as written."""
    from speccascade import rules

    specs = set()
    for _, command in COMMANDS:
        if command in SKIPPED:
            continue
        words = shlex.split(command)
        for flag, value in zip(words, words[1:]):
            if flag in ("--rules", "--rule"):
                specs |= {s for s in value.split(",") if s.split(":")[0] not in NOT_RULES}
    assert {"always", "gain", "tokenv3:0.5"} <= specs
    refused = []
    for spec in sorted(specs):
        try:
            rules.parse(spec)
        except Exception as err:
            refused.append(f"{spec}: {err}")
    assert not refused, refused


def test_option_tables_name_real_options(parser):
    """Each option in commands.md's tables (under the heading named after its command) is an option of
    that command, so a renamed or removed option cannot stay documented."""
    from speccascade.cli import COMMANDS as COMMAND_NAMES

    text = (ROOT / "docs" / "commands.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    checked, unknown = 0, []
    for section in sections:
        name = section.split("\n", 1)[0].strip()
        if name not in COMMAND_NAMES:
            continue
        sub = parser._subcommands_action._name_parser_map[name]
        known = {s for action in sub._actions for s in action.option_strings}
        for option in re.findall(r"^\| `(--[\w-]+)` \|", section, flags=re.M):
            checked += 1
            if option not in known:
                unknown.append(f"{name} {option}")
    assert checked > 100 and not unknown, unknown
