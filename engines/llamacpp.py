"""The llama.cpp engine: a real model on a CPU, when a pool names a local GGUF file.

It is llama-cpp-python's own OpenAI-compatible server; this module only builds its command line
and checks, before anything starts, that the file exists and the server is installed.
llama-cpp-python is an optional extra, outside the default install because it compiles
llama.cpp for minutes:  pip install -e '.[llamacpp]'

    python -m engines.llamacpp --gguf models/qwen.gguf --model demo-chat --port 9110
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# The server needs these beside llama_cpp itself (the `[server]` extra brings them).
_SERVER_MODULES = ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
INSTALL_HINT = "pip install -e '.[llamacpp]' (compiles llama.cpp: takes minutes)"


class LlamaCppUnavailable(RuntimeError):
    """The llama.cpp engine cannot start here; the message says why in one line."""


def command(gguf: str, model_id: str, host: str, port: int, python: str = sys.executable,
            *, n_ctx: int | None = None) -> list[str]:
    """The command line of llama-cpp-python's OpenAI-compatible server for one GGUF file."""
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model_id,
           "--host", host, "--port", str(port)]
    if n_ctx is not None:
        cmd += ["--n_ctx", str(n_ctx)]
    return cmd


def check_available(gguf: str, python: str = sys.executable) -> None:
    """Raise LlamaCppUnavailable unless `gguf` is a file and `python` can import the server."""
    path = Path(gguf)
    if not path.is_file():
        raise LlamaCppUnavailable(f"GGUF file not found: {gguf} (the pool's `gguf` must name a local file)")
    missing = _missing_modules(python)
    if missing:
        raise LlamaCppUnavailable(
            f"llama-cpp-python's server is not installed (missing: {', '.join(missing)}); "
            f"it is an optional extra: {INSTALL_HINT}")


def _missing_modules(python: str) -> list[str]:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return [m for m in _SERVER_MODULES if _find_spec(m) is None]
    probe = ("import importlib.util as u; "
             f"print(' '.join(m for m in {_SERVER_MODULES!r} if u.find_spec(m) is None))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LlamaCppUnavailable(f"cannot run {python} to look for llama-cpp-python: {exc}") from None
    return out.stdout.split()


def _find_spec(name: str) -> object | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engines.llamacpp",
                                description="Run a GGUF model with llama-cpp-python's OpenAI-compatible server.")
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", required=True, help="the model id clients send")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=None)
    a = p.parse_args(argv)
    try:
        check_available(a.gguf)
    except LlamaCppUnavailable as exc:
        sys.exit(f"llamacpp: {exc}")
    cmd = command(a.gguf, a.model, a.host, a.port, n_ctx=a.n_ctx)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
