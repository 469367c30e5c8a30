"""What every command shares: quiet libraries, and a mistake ended the same way everywhere.

Each command (`main`, `evaluate`, `convert`, `data.prepare`, `study`, `bench`) imports this module
before JAX or TensorFlow load, so TensorFlow's C++ start-up lines stay off the console (see
_QuietTensorFlowImport), and ends an error as one line, `error: ...` naming the problem and the
fix, with exit status 1 and the traceback in WORKDIR/errors.log (before a workdir exists, in
$TMPDIR/masksub_jax_errors.log; printed too with --verbose).
"""
import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import traceback

# TensorFlow is only our input pipeline: its C++ INFO and WARNING lines are not the user's business.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ERROR_LOG = "errors.log"


class CommandError(Exception):
    """A mistake the user can fix; the message names it and the fix (printed without a type name)."""


def report(error: BaseException, log_dir: str | None, *, verbose: bool = False, process: str = "") -> None:
    """The traceback into LOG_DIR/errors.log (and the console with `verbose`); the message last."""
    trace = "".join(traceback.format_exception(error))
    log = append_error_log(log_dir, process, trace)
    if verbose:
        print(trace, file=sys.stderr, end="")
    where = f" (traceback: {log})" if log and not verbose else ""
    plain = (CommandError, ValueError, OSError, FloatingPointError)
    name = "" if isinstance(error, plain) else f"{type(error).__name__}: "
    message = " ".join(str(error).split("\n")) if str(error) else type(error).__name__
    print(f"error{process}: {name}{message}{where}", file=sys.stderr, flush=True)


def append_error_log(log_dir: str | None, process: str, trace: str) -> str | None:
    """Appends to LOG_DIR/errors.log where that folder exists (a failed first start creates none),
    else to one in the temporary directory. Returns its path, None if nothing could be written."""
    import tempfile
    import time

    from masksub_jax import workdir as workdir_lib
    try:
        folder = workdir_lib.path(log_dir) if log_dir else None
        log = folder / ERROR_LOG if folder is not None and folder.is_dir() else (
            workdir_lib.path(tempfile.gettempdir()) / "masksub_jax_errors.log")
        old = log.read_text() if log.exists() else ""
        workdir_lib.write_text(log, f"{old}--- {time.strftime('%Y-%m-%d %H:%M:%S')}{process}\n{trace}")
        return str(log)
    except Exception:  # an unwritable workdir may be the error itself
        return None


@contextlib.contextmanager
def errors_in_one_line(log_dir: str | None = None, *, verbose: bool = False):
    """Around a command's body: any error ends the process with `report`'s line and exit status 1;
    Ctrl-C with a line and 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("Interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        report(e, log_dir, verbose=verbose)
        sys.exit(1)


def parse_flags(argv):
    """absl's flag parsing for a command (`app.run(main, flags_parser=cli.parse_flags)`): a bad flag
    or config file ends the process with one line."""
    from absl import flags
    try:
        argv = flags.FLAGS([argv[0], *(resolve_config_arg(a) for a in argv[1:])])
    except Exception as e:
        print(f"error: {flag_error_message(e, argv)}", file=sys.stderr, flush=True)
        sys.exit(1)
    from absl import logging
    if not flags.FLAGS["verbosity"].present:  # results and progress are printed; library INFO logs on request
        logging.set_verbosity(logging.WARNING)
    return argv


# What TensorFlow's C++ logging prints while it loads: absl's notice and INFO / WARNING records.
_START_UP_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} |"
                               r"To enable the following instructions:)")


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Loads TensorFlow, when anything first imports it, with its start-up lines (the oneDNN and
    CPU-feature notices, twice) kept off the console: since 2.19 they go through absl's C++ logging,
    which TF_CPP_MIN_LOG_LEVEL no longer reaches (tensorflow/tensorflow#100442), so the import's stderr
    is filtered at the file descriptor. Errors and anything else printed pass through. Stays in place
    for mere look-ups (`importlib.util.find_spec("tensorflow")`, as etils does) until the import."""

    _finding = False

    def find_spec(self, name, path, target=None):
        if name != "tensorflow" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)  # what the finders after this one say
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredStderrLoader(spec.loader, self)
        return spec


class _FilteredStderrLoader(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        import tempfile
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        sys.stderr.flush()
        console = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self._loader.exec_module(module)
            finally:
                os.dup2(console, 2)
                os.close(console)
                captured.seek(0)
                lines = captured.read().decode(errors="replace").splitlines(keepends=True)
                sys.stderr.write("".join(line for line in lines if not _START_UP_CHATTER.match(line)))
                sys.stderr.flush()


if "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())


def resolve_config_arg(arg: str) -> str:
    """`--config=NAME[:ARG]` for a packaged config (`--config=digits`, `--config=vit_b:epochs=800`)
    as its file, from any directory; a config file that does not exist is an error listing the names."""
    if not arg.startswith("--config="):
        return arg
    spec = arg.removeprefix("--config=")
    path, colon, config_arg = spec.partition(":")
    if os.path.exists(path):
        return arg
    from masksub_jax import configs
    name = path.removeprefix("configs/").removesuffix(".py")  # configs/digits.py outside the checkout too
    if name in configs.names():
        return f"--config={os.path.join(os.path.dirname(configs.__file__), name + '.py')}{colon}{config_arg}"
    raise CommandError(f"no config file {path!r} (from {os.getcwd()}). Give a config file's path, or the name of "
                       f"a packaged config, e.g. --config=digits: {', '.join(configs.names())}.")


def flag_error_message(error: Exception, argv) -> str:
    """One line for a flag or config-file error: an unknown --config.KEY named with the closest known
    key, a config file's own error, or absl's message."""
    from absl import flags

    from masksub_jax import config as config_lib
    known = dict(config_lib.flatten(config_lib.base()))
    for arg in argv[1:]:
        key = arg[len("--config."):].partition("=")[0] if arg.startswith("--config.") else None
        if key is not None and key not in known:
            return config_lib.unknown_key_message(key)
    text = str(error)
    if isinstance(error, CommandError):
        return text
    if "Error whilst parsing config file" in text:  # ml_collections puts the config's traceback in it
        last = text.strip().splitlines()[-1].removeprefix("ValueError: ")  # the config's own message
        return f"{last} (from the config file)"
    return f"{text} (see --helpfull)" if isinstance(error, flags.Error) else f"{type(error).__name__}: {text}"
