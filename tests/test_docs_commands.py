"""The commands the docs print match the code: every option exists.

A renamed or removed option leaves a printed command that fails at once (a script or CLI option) or, worse, is
silently ignored (a ``monai.bundle run`` override naming no config key). The commands are read from the ``bash``
blocks of ``README.md``, ``docs/*.md``, ``benchmarks/README.md`` and ``bundle/docs/README.md`` (line continuations,
quotes spanning lines and ``NAME="..."`` variables of the page) and from inline spans that hold a whole command
(options, no ``...`` or ``DIR`` / ``N`` patterns), then:

- benchmark scripts: the arguments go through the script's own ``argparse`` parser (its ``parse_args(argv)`` where
  it has one, so that its checks run too);
- ``medsegdiff-monai`` / ``python -m medsegdiff_monai``: through :func:`medsegdiff_monai.cli.build_parser`;
- ``python -m monai.bundle run``: every override must name a key of the merged ``--config_file`` configs.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark
from monai.bundle import ConfigParser

from medsegdiff_monai.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_README = ROOT / "bundle" / "docs" / "README.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), BENCHMARKS / "README.md", BUNDLE_README]
SCRIPT = re.compile(r"(?:^|/)(bench_\w+)\.py$")
OPERATORS = {"&&", "||", ";", "|", "&"}
PLACEHOLDER = re.compile(r"<[^<>\n]+>")  # <checkout of ...>: any value
INLINE_COMMAND = re.compile(r"`((?:python3?|\.venv/bin/\S+|medsegdiff-monai|torchrun) [^`\n]*)`")
# ``monai.bundle run`` arguments that are not config overrides
BUNDLE_RUN_OPTIONS = {"meta_file", "config_file", "logging_file", "tracking", "args_file", "init_id", "final_id"}


def _expand(tokens: list[str], variables: dict[str, str]) -> list[str]:
    """``$NAME`` tokens replaced by their split value, other ``$NAME``s by a folder; a closing subshell parenthesis
    dropped."""
    expanded: list[str] = []
    for token in tokens:
        if token.startswith("$") and token[1:] in variables:
            expanded.extend(shlex.split(variables[token[1:]]))
            continue
        token = re.sub(r"\$\w+", "/tmp/out", token)
        expanded.append(token[:-1] if token.endswith(")") and "(" not in token else token)
    return expanded


def bash_commands(block: str, variables: dict[str, str] | None = None) -> list[list[str]]:
    """The simple commands of a bash block, as token lists; ``variables`` holds (and gains) the ``NAME="..."``
    assignments of the page's earlier blocks."""
    variables = {} if variables is None else variables
    commands: list[list[str]] = []
    pending = ""
    for line in PLACEHOLDER.sub("VALUE", block.replace("\\\n", " ")).splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # a quoted argument goes on over the next line
            continue
        pending = ""
        if len(tokens) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0], flags=re.DOTALL):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        command: list[str] = []
        for token in _expand(tokens, variables):
            if token in OPERATORS:
                commands.append(command)
                command = []
            else:
                command.append(token)
        commands.append(command)
    assert not pending, f"unclosed quote in a bash block: {pending!r}"
    return commands


def doc_commands() -> list[tuple[Path, list[str]]]:
    """(page, tokens) of every command the docs print."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        variables: dict[str, str] = {}
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
            found += [(doc, command) for command in bash_commands(block, variables)]
        spans = [shlex.split(PLACEHOLDER.sub("VALUE", span)) for span in INLINE_COMMAND.findall(text)]
        found += [(doc, tokens) for tokens in spans if _is_complete(tokens)]
    return found


def _is_complete(tokens: list[str]) -> bool:
    """Whether an inline span is a whole command rather than a name in prose (``medsegdiff-monai check``) or a
    pattern (``... --out DIR --subjects N``)."""
    return any(token.startswith("--") for token in tokens) and not any(
        token == "..." or re.fullmatch(r"[A-Z][A-Z_]*(/\S*)?", token) for token in tokens
    )


def _arguments(tokens: list[str]) -> list[str]:
    """``tokens`` up to a redirection."""
    for index, token in enumerate(tokens):
        if token.startswith((">", "2>", "<")):
            return tokens[:index]
    return tokens


def _where(doc: Path, command: list[str]) -> str:
    return f"{doc.relative_to(ROOT)}: {shlex.join(command)}"


def script_invocations() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every benchmark script command."""
    found = []
    for doc, command in doc_commands():
        for index, token in enumerate(command):
            match = SCRIPT.search(token)
            if match:
                found.append((_where(doc, command), match.group(1), _arguments(command[index + 1 :])))
                break
    return found


def cli_invocations() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every ``medsegdiff-monai`` command."""
    found = []
    for doc, command in doc_commands():
        for index, token in enumerate(command):
            if Path(token).name == "medsegdiff-monai" or (token == "medsegdiff_monai" and command[index - 1] == "-m"):
                found.append((_where(doc, command), _arguments(command[index + 1 :])))
                break
    return found


def bundle_runs() -> list[tuple[str, list[Path], dict[str, str | None]]]:
    """(where, config files, overrides) of every ``monai.bundle run`` command that names its configs."""
    found = []
    for doc, command in doc_commands():
        if "monai.bundle" not in command:
            continue
        arguments = _arguments(command[command.index("monai.bundle") + 1 :])
        if arguments[:1] != ["run"]:
            continue
        options: dict[str, str | None] = {}
        name = None
        for token in arguments[2:] if len(arguments) > 1 and not arguments[1].startswith("--") else arguments[1:]:
            if token.startswith("--"):
                name = token[2:]
                options[name] = None
            elif name is not None:
                options[name], name = token, None
        config_file = options.get("config_file")
        if config_file is None:  # "run training ..." in prose, its configs not named
            continue
        names = ast.literal_eval(config_file) if config_file.startswith("[") else [config_file]
        base = ROOT / "bundle" if doc == BUNDLE_README else ROOT
        overrides = {key: value for key, value in options.items() if key not in BUNDLE_RUN_OPTIONS}
        found.append((_where(doc, command), [base / name for name in names], overrides))
    return found


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parse_script_arguments(script: str, arguments: list[str]) -> None:
    """Parse ``arguments`` as ``script`` would; argparse's ``SystemExit`` on a bad one."""
    module = load_benchmark(script)
    parse_args = getattr(module, "parse_args", None)
    if parse_args is not None and inspect.signature(parse_args).parameters:
        parse_args(arguments)
        return

    def capture(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parser(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            (parse_args or module.main)()
        except _Parser as captured:
            parser = captured.parser
    parser.parse_args(arguments)


def missing_override_keys(config_files: list[Path], overrides: dict[str, str | None]) -> list[str]:
    """The override names that are no key of the merged configs (``#`` reaches into nested ones)."""
    parser = ConfigParser()
    parser.read_config([str(path) for path in config_files])
    absent = object()
    return [key for key in overrides if parser.get(key, absent) is absent]


SCRIPTS = script_invocations()
CLI = cli_invocations()
BUNDLE_RUNS = bundle_runs()


def test_the_docs_print_these_commands():
    assert len(SCRIPTS) >= 40 and len(CLI) >= 10 and len(BUNDLE_RUNS) >= 15, (len(SCRIPTS), len(CLI), len(BUNDLE_RUNS))
    assert {"bench_gpu", "bench_norm_kernels", "bench_public_medsegdiff", "bench_bundle_training"} <= {
        script for _, script, _ in SCRIPTS
    }


@pytest.mark.parametrize(("where", "script", "arguments"), SCRIPTS, ids=[where[:70] for where, _, _ in SCRIPTS])
def test_benchmark_command_parses(where, script, arguments, capsys):
    try:
        parse_script_arguments(script, arguments)
    except SystemExit as error:
        pytest.fail(f"{where}\n{script} refused its arguments (exit {error.code}): {capsys.readouterr().err}")


@pytest.mark.parametrize(("where", "arguments"), CLI, ids=[where[:70] for where, _ in CLI])
def test_cli_command_parses(where, arguments, capsys):
    try:
        build_parser().parse_args(arguments)
    except SystemExit as error:
        pytest.fail(f"{where}\nmedsegdiff-monai refused its arguments (exit {error.code}): {capsys.readouterr().err}")


@pytest.mark.parametrize(
    ("where", "config_files", "overrides"), BUNDLE_RUNS, ids=[where[:70] for where, _, _ in BUNDLE_RUNS]
)
def test_bundle_run_overrides_name_config_keys(where, config_files, overrides):
    assert all(path.is_file() for path in config_files), where
    assert missing_override_keys(config_files, overrides) == [], where


def test_a_wrong_option_is_caught():
    """The checks themselves refuse an option that does not exist, a variant a script refuses and a misspelt
    override."""
    with pytest.raises(SystemExit):
        parse_script_arguments("bench_norm_kernels", ["--no-such-option", "1"])
    with pytest.raises(SystemExit):
        parse_script_arguments("bench_gpu", ["--train-variants", "bf16+cl+graphs", "bf16+cl+graphs+determ"])
    with pytest.raises(SystemExit):
        parse_script_arguments("bench_sampling_cpu", ["--stepz", "8"])
    train = [ROOT / "bundle" / "configs" / "train.json"]
    assert missing_override_keys(train, {"stages#0#epochs": "20", "stages#0#epoch": "20", "cpu_amp": "true"}) == [
        "stages#0#epoch",
        "cpu_amp",
    ]


def test_bash_commands_follow_the_shell():
    block = (
        'B="python3 bench_x.py --a 1"\n'
        '$B --b \'{"k": 1,\n "j": 2}\' && python3 bench_y.py --c \\\n    $OUT/d   # comment\n'
        "(cd /tmp && python3 bench_z.py --e <some path>)\n"
    )
    assert bash_commands(block) == [
        ["python3", "bench_x.py", "--a", "1", "--b", '{"k": 1,\n "j": 2}'],
        ["python3", "bench_y.py", "--c", "/tmp/out/d"],
        ["(cd", "/tmp"],
        ["python3", "bench_z.py", "--e", "VALUE"],
    ]
