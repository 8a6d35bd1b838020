"""Command lines over config dataclasses: one way to turn flags into a config.

Every script that trains (`pretrain.py`, `finetune.py`, `evaluate.py`) declares its
settings flags as a table of `Flag`s, each naming a field of a config dataclass by its
dotted path (`encoder.width`, `scarf.temperature`). The table then

- adds the flags to an `argparse` parser, with the dataclass default shown once in
  the help text (the flags themselves default to None, so "not given" is known);
- applies the flags a user gave onto a config (defaults <- preset <- flags), refusing
  a method-specific flag for another method;
- names the flag of a config path, so that a validation error about
  `scarf.corruption_rate` can say `--corruption-rate`.

Defaults live in `keras_ssrl.config` only; no script restates them.

Example:

```python
FLAGS = FlagTable(PretrainConfig, [
    Flag("--epochs", "epochs", int, "passes over the pre-training split"),
    Flag("--temperature", "scarf.temperature", float, "InfoNCE temperature",
         methods=("scarf",)),
])
FLAGS.add_to(parser)
config = FLAGS.apply(args, PretrainConfig(), method=args.method)
```
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shlex
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    """One command-line flag that sets one field of a config dataclass.

    Attributes:
        name: the flag, `--width`.
        path: the dotted config path it sets, `encoder.width`. `{method}` in the path
            is replaced by the run's method (`{method}.corruption_rate`).
        type: callable converting the text (int, float, str), or `bool` for an
            on/off flag (`--symmetric` / `--no-symmetric`).
        help: what it sets (the default is appended from the config).
        choices: allowed values, if any.
        methods: the methods it applies to (None: all).
        metavar: the placeholder shown in the help text.
    """

    name: str
    path: str
    type: Callable = str
    help: str = ""
    choices: Sequence | None = None
    methods: Sequence[str] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def get_path(config, path: str):
    """The value at a dotted path of a (nested) config dataclass."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def set_path(config, path: str, value) -> None:
    """Sets the value at a dotted path of a (nested) config dataclass."""
    *parents, name = path.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or name not in {
        f.name for f in dataclasses.fields(target)
    }:
        raise AttributeError(f"no config field {path!r}")
    setattr(target, name, value)


class FlagTable:
    """The settings flags of a command line, over one config dataclass.

    Args:
        config_class: the dataclass whose defaults the help text shows.
        flags: the `Flag`s.
        defaults: an instance to take defaults from (default: `config_class()`).
    """

    def __init__(self, config_class: type, flags: Sequence[Flag], defaults=None):
        self.config_class = config_class
        self.flags = tuple(flags)
        self.defaults = defaults if defaults is not None else config_class()

    def _default_text(self, flag: Flag) -> str:
        if "{method}" in flag.path:
            methods = flag.methods or ()
            shown = [
                f"{m} {get_path(self.defaults, flag.path.format(method=m))}"
                for m in methods
            ]
            return ", ".join(shown)
        return str(get_path(self.defaults, flag.path))

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup):
        """Adds every flag, each defaulting to None (not given)."""
        for flag in self.flags:
            default = self._default_text(flag)
            # A None default means "decided at run time": the help says how.
            text = flag.help + (f" (default: {default})" if default != "None" else "")
            if flag.methods:
                text = f"{'/'.join(flag.methods)}: {text}"
            if flag.type is bool:
                parser.add_argument(
                    flag.name,
                    dest=flag.dest,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=text,
                )
                continue
            parser.add_argument(
                flag.name,
                dest=flag.dest,
                type=flag.type,
                default=None,
                choices=flag.choices,
                metavar=flag.metavar,
                help=text,
            )
        return parser

    def given(self, args: argparse.Namespace) -> list[Flag]:
        """The flags the user gave."""
        return [f for f in self.flags if getattr(args, f.dest, None) is not None]

    def apply(self, args: argparse.Namespace, config, method: str | None = None):
        """Sets the given flags' values on `config` (in place) and returns it.

        Raises:
            ValueError: a flag that does not apply to `method`.
        """
        for flag in self.given(args):
            if flag.methods and method not in flag.methods:
                raise ValueError(
                    f"{flag.name} applies to {', '.join(flag.methods)}, not {method}"
                )
            path = flag.path.format(method=method)
            set_path(config, path, getattr(args, flag.dest))
        return config

    def flag_of(self, path: str | None) -> str | None:
        """The flag that sets config path `path`, if there is one."""
        if path is None:
            return None
        for flag in self.flags:
            if flag.path == path:
                return flag.name
            if "{method}" in flag.path and any(
                flag.path.format(method=m) == path for m in flag.methods or ()
            ):
                return flag.name
        return None


# --- Console: the flags every command line shares, and its messages ---------------

LOGGER_NAME = "keras_ssrl"
# TensorFlow's native start-up lines (oneDNN, CUDA plugin registration, XLA service,
# absl's pre-initialisation notice) go through its C++ logging, which reads these
# variables once, when the library loads; they must be set before the first import.
QUIET_NATIVE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}


def quiet_native_logs(argv: Sequence[str] | None = None) -> None:
    """Silences TensorFlow's C++ start-up noise unless `--verbose` is on the line.

    Call it at the top of a script, before anything imports tensorflow: flags are not
    parsed yet then, so `--verbose` is looked for in `argv` (default `sys.argv`). A
    variable the user set is left as it is.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" in argv:
        return
    for name, value in QUIET_NATIVE_ENV.items():
        os.environ.setdefault(name, value)


# XLA's C++ logging goes through absl, which ignores TF_CPP_MIN_LOG_LEVEL in TensorFlow
# 2.16: its "I0000 ... service.cc:145] XLA service ..." lines and absl's notice about
# InitializeLog reach stderr whatever the environment says. They are recognised by
# absl's line format and dropped from the process's stderr by `native_log_filter`.
_NATIVE_LINE = re.compile(
    rb"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called)"
)


def _pump(source: int, target: int) -> None:
    """Copies `source` to `target` until EOF, dropping absl's native log lines.

    Text is forwarded as soon as it arrives, so that a line without its newline yet
    (a progress line ending in a carriage return) shows at once; only a fragment that
    may start a native line (`I`, `W`, `E`) waits for the rest of its line.
    """
    pending, inside = b"", False  # inside: in a line already forwarded in part
    while chunk := os.read(source, 1 << 16):
        *lines, tail = (pending + chunk).split(b"\n")
        pending = b""
        for line in lines:
            if inside or not _NATIVE_LINE.match(line):
                os.write(target, line + b"\n")
            inside = False
        if tail and (inside or tail[:1] not in (b"I", b"W", b"E")):
            os.write(target, tail)
            inside = True
        elif tail:
            pending = tail
    if pending:
        os.write(target, pending)


@contextlib.contextmanager
def native_log_filter(argv: Sequence[str] | None = None):
    """Drops absl's native log lines from this process's stderr inside the block.

    Only while TensorFlow's C++ logs are silenced (`quiet_native_logs`, not under
    `--verbose`) and only around a command line's `main`: everything else written to
    stderr, by Python or by child processes, goes through unchanged.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" in argv or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer here: the pump sees EOF
        pump.join(timeout=5)
        if not pump.is_alive():  # else a child process still holds the pipe
            os.close(read_end)
            os.close(saved)


def run_main(main: Callable[[], int]) -> None:
    """A command line's `__main__`: `main()` under the native log filter, then exit."""
    with native_log_filter():
        code = main()
    sys.exit(code)


def add_orientation_flags(group) -> None:
    """`--genes-as-rows` / `--samples-as-rows` for a table's orientation.

    Neither has a default: the orientation is detected from the table's header and
    first column unless one is given (`genes_as_rows` stays None).
    """
    orient = group.add_mutually_exclusive_group()
    orient.add_argument(
        "--genes-as-rows",
        dest="genes_as_rows",
        action="store_true",
        default=None,
        help="the table has one row per gene (detected when neither is given)",
    )
    orient.add_argument(
        "--samples-as-rows",
        dest="genes_as_rows",
        action="store_false",
        default=None,
        help="the table has one row per sample (detected when neither is given)",
    )


def add_console_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--quiet`, `--verbose` and `--version` (the package's version)."""
    from keras_ssrl import __version__

    group = parser.add_argument_group("console")
    loudness = group.add_mutually_exclusive_group()
    loudness.add_argument(
        "--quiet", action="store_true", help="warnings and errors only"
    )
    loudness.add_argument(
        "--verbose",
        action="store_true",
        help="debug messages, and TensorFlow's own start-up logs",
    )
    group.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s (keras_ssrl {__version__})",
        help="print the version and exit",
    )
    return parser


class _ConsoleHandler(logging.Handler):
    """Info and debug to stdout, warnings and errors to stderr.

    The streams are looked up at each message, not stored, so that a caller who
    replaces `sys.stdout` (a test, a notebook) still receives the messages.
    """

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _PlainFormatter(logging.Formatter):
    """The message alone; warnings and errors prefixed `warning:` / `error:`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def setup_logging(args: argparse.Namespace | None = None) -> logging.Logger:
    """The command line's logger: INFO, WARNING with `--quiet`, DEBUG with `--verbose`.

    Also quiets TensorFlow's Python-side logger unless `--verbose`.
    """
    verbose = bool(getattr(args, "verbose", False))
    quiet = bool(getattr(args, "quiet", False))
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [_ConsoleHandler()]
    logger.handlers[0].setFormatter(_PlainFormatter())
    logger.setLevel(level)
    logger.propagate = False
    logging.getLogger("tensorflow").setLevel(
        logging.DEBUG if verbose else logging.ERROR
    )
    return logger


def log_line(line: str) -> None:
    """Logs a library progress line; one starting `warning: ` as a warning.

    The library reports through plain `log(line)` callables; this is the one the
    command lines pass.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if line.startswith("warning: "):
        logger.warning(line.removeprefix("warning: "))
    else:
        logger.info(line)


def next_command(*words: str) -> str:
    """A shell command line from its words, each quoted when it needs to be."""
    return " ".join(shlex.quote(str(word)) for word in words)


def print_next(*words: str) -> None:
    """Logs the exact command that comes next, as the last line of a tool."""
    logging.getLogger(LOGGER_NAME).info("next: %s", next_command(*words))
