"""What XLA's compiler said about a lowered step, kept on disk, so that planning the same step for the
same target again (the plan again with --find_batch, a suggestion tried before) takes seconds instead
of a TPU compile of minutes. JAX's persistent compilation cache cannot serve here: a compile-only TPU
client cannot load the executables it wrote (jax 0.10.2: "PjRtCompiler must be constructed with a
Client"). What is kept is only what the plan reads: the memory analysis, XLA's FLOP count, or the
compiler's out-of-memory message.

An entry's key is a SHA-256 of the lowered program's text (its shapes, dtypes and shardings), the
devices (platform, kind, coordinates), what the devices do not say about the slice (`Cache.target`:
libtpu's topology arguments, the torus links among them), the compiler's build
(`platform_version`: libtpu's build date and changelist) and the jax, jaxlib and libtpu versions,
the XLA and libtpu flags from the environment, and every JAX setting (the optimisation and memory
levels, the remat pass, ...). A change to any of them is another entry: compiled, not read. An
entry that cannot be read whole (damaged, another layout) is compiled again and rewritten, never used.
"""
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile

import jax


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the compiler said about one step: its buffers per device (`memory_analysis`) and FLOP
    count, or the message it refused the step with for lack of HBM."""
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    xla_flops: float | None = None
    out_of_memory: str | None = None

    @classmethod
    def of(cls, compiled, xla_flops: float | None) -> "Outcome":
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), xla_flops)

    @classmethod
    def from_json(cls, text: str) -> "Outcome | None":
        """The outcome `text` holds, or None where it is not one whole (every field, each of its type)."""
        try:
            fields = json.loads(text)
            outcome = cls(**fields) if isinstance(fields, dict) else None
        except (ValueError, TypeError):
            return None
        whole = outcome is not None and len(fields) == len(dataclasses.fields(cls)) and all(
            isinstance(getattr(outcome, f.name), f.type) for f in dataclasses.fields(cls))
        return outcome if whole else None


@dataclasses.dataclass(frozen=True)
class Cache:
    """Outcomes kept in `directory`; `target` is what the devices do not say about the slice."""
    directory: str
    target: str = ""

    def key(self, lowered, devices: list) -> str:
        def version(package):
            try:
                return importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                return None
        context = {
            "devices": [(d.platform, d.device_kind, getattr(d, "coords", None), getattr(d, "core_on_chip", None))
                        for d in devices],
            "target": self.target,
            "compiler": devices[0].client.platform_version,
            "versions": [version(p) for p in ("jax", "jaxlib", "libtpu", "libtpu-nightly")],
            "environment": [os.environ.get(name) for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "TPU_LIBRARY_PATH")],
            "jax": {name: value for name, value in jax.config.values.items()  # not where JAX keeps executables
                    if "compilation_cache" not in name and "persistent_cache" not in name},
        }
        digest = hashlib.sha256(json.dumps(context, sort_keys=True, default=repr).encode())
        digest.update(lowered.as_text().encode())
        return digest.hexdigest()

    def load(self, key: str) -> Outcome | None:
        try:
            with open(os.path.join(self.directory, key + ".json")) as f:
                return Outcome.from_json(f.read())
        except OSError:
            return None

    def save(self, key: str, outcome: Outcome) -> None:
        """Writes `outcome` whole or not at all (a temporary file renamed into place). A disk that
        fails now costs the entry, not the plan: a warning, and the plan goes on."""
        temporary = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=key, suffix=".tmp")
            with os.fdopen(descriptor, "w") as f:
                json.dump(dataclasses.asdict(outcome), f)
            os.replace(temporary, os.path.join(self.directory, key + ".json"))
        except OSError as e:
            if temporary and os.path.exists(temporary):
                os.remove(temporary)
            print(f"warning: the plan cache could not keep this step ({type(e).__name__}: {e.strerror or e}); "
                  "the next plan of it compiles again.", file=sys.stderr, flush=True)


def default_directory() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "masksub_jax", "plans")


def unwritable(directory: str) -> str | None:
    """Why entries cannot be written to `directory` (asked before minutes of compiling), or None."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
