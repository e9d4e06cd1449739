"""What the four scripts share on the command line: one convention, one error format, checks made up front.

Every script uses argparse: `--key value` and `--key=value` both work, `--help` lists every option with its
default, booleans are `--flag` / `--no-flag`, and `--flag=true|false|1|0|yes|no|on|off` (nanoGPT's configurator
style) works too. A mistake the user can make ends in one line on stderr that starts
with "error:" and names the flag or file, and exit code 2; never a traceback, never a file touched.
"""

import argparse
import ast
import inspect
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, "error: ...", exit code 2 (not usage + message)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A mistake in the command line or its inputs; main() prints it as one "error: ..." line and exits 2."""


def fail(message: str, code: int = 2) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def field_comments(cls) -> dict[str, str]:
    """{field: its end-of-line comment} from the dataclass's source (and its bases'), so --help cannot drift from
    the code."""
    comments = {}
    for base in cls.__mro__[1:]:
        if hasattr(base, "__dataclass_fields__"):
            comments |= field_comments(base)
    source = inspect.getsource(cls).splitlines()
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = source[node.lineno - 1]
            comments[node.target.id] = line.split("#", 1)[1].strip() if "#" in line else ""
    return comments


def add_dataclass_options(parser: argparse.ArgumentParser, cls, title: str):
    """One option per field of `cls`, typed by its annotation. Defaults are argparse.SUPPRESS, so that the
    namespace holds only what the user typed (presets and saved settings fill in the rest)."""
    group = parser.add_argument_group(title)
    comments = field_comments(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
        if "bool" in kind:
            group.add_argument(f"--{f.name}", f"--no-{f.name}", action=BoolFlag, default=argparse.SUPPRESS,
                               help=help_text)
            continue
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        if "None" in kind:
            convert = none_or(convert)
        group.add_argument(f"--{f.name}", type=convert, default=argparse.SUPPRESS, help=help_text,
                           metavar=kind.split(" ")[0].upper())


class BoolFlag(argparse.Action):
    """--flag, --no-flag, and --flag=VALUE with VALUE one of TRUE or FALSE below (any case)."""
    TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        negated = option_string.startswith("--no-")
        if value is None:
            setattr(namespace, self.dest, not negated)
        elif negated or value.lower() not in self.TRUE + self.FALSE:
            flag = self.option_strings[0]
            parser.error(f"{option_string}={value}: write {flag}, --no-{flag[2:]}, or {flag}=true / {flag}=false")
        else:
            setattr(namespace, self.dest, value.lower() in self.TRUE)


def none_or(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)
    parse.__name__ = convert.__name__
    return parse


def at_least(minimum: float, kind=int):
    """An argparse type: a number >= minimum."""
    def parse(text: str):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def add_model_options(parser: argparse.ArgumentParser):
    """--model, --thought_len, --device: how eval.py and generate.py load a model."""
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint folder, built-in name or Hub id "
                        "(default: %(default)s)")
    parser.add_argument("--thought_len", type=at_least(1), default=None,
                        help="thought tokens per thought; default: the checkpoint's own")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu (default: auto)")


def resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but this machine has no CUDA GPU that torch can use; use --device cpu")
    return device


def check_writable(path: str | Path, flag: str):
    """Fail now, not after an hour of work, if `path` cannot be written: its folder must exist."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {path.parent} is not writable")
