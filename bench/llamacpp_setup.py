"""llama.cpp for bench/vs_llamacpp.py: build or find `llama-cpp-python`, convert a checkpoint with
llama.cpp's own `convert_hf_to_gguf.py`, and a worker process that decodes greedily with it.

llama-cpp-python is an optional *bench* dependency, never a test or runtime one: it lives in its
own virtual environment (default `bench/.llama-venv`, gitignored; `--llama-venv` or
$NANOSEEK_LLAMA_VENV pick another, e.g. one you already have), built from the sdist so that its
source tree (vendor/llama.cpp: the converter and gguf-py) is at hand:

    python bench/llamacpp_setup.py build     # ~8 min with gcc + cmake on 2 cores, once
    python bench/llamacpp_setup.py where     # the venv's python and the llama.cpp source tree

The build is a plain CPU one (`GGML_NATIVE`: the instruction sets of this machine), run under
`nice -n 19`. The project's own venv gets nothing installed: the converter runs with the
project's python (it needs torch, transformers, numpy, pyyaml, which nanoseek's test extras
already bring) and imports `gguf` from the source tree's gguf-py, as the converter itself does.

The worker (`python bench/llamacpp_setup.py worker`, started by the bench with the llama venv's
python) speaks JSON lines on stdin/stdout: it loads a GGUF, sets its thread count and decodes
greedily through llama.cpp's C API (`llama_decode` one token at a time, llama.cpp's greedy
sampler), so the Python per-token cost is a few ctypes calls. It imports only the standard
library and llama_cpp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_VENV = os.environ.get("NANOSEEK_LLAMA_VENV", os.path.join(HERE, ".llama-venv"))
VERSION = os.environ.get("NANOSEEK_LLAMA_CPP_VERSION", "0.3.36")  # the version measured
# a CPU build for this machine; no BLAS (decode is GEMV), no GPU back-ends, no tools or tests
CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF "
    "-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)


# ------------------------------------------------------------------------------- find / build
def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def source_tree(venv: str) -> str | None:
    """The extracted sdist's vendor/llama.cpp under VENV/src (newest version first)."""
    src = os.path.join(venv, "src")
    if not os.path.isdir(src):
        return None
    for name in sorted(os.listdir(src), reverse=True):
        tree = os.path.join(src, name, "vendor", "llama.cpp")
        if os.path.isfile(os.path.join(tree, "convert_hf_to_gguf.py")):
            return tree
    return None


def installed_version(venv: str) -> str | None:
    py = venv_python(venv)
    if not os.path.exists(py):
        return None
    r = subprocess.run(
        [py, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def find(venv: str = DEFAULT_VENV) -> tuple[str, str] | None:
    """(python with llama_cpp, llama.cpp source tree), or None when either is missing."""
    tree = source_tree(venv)
    if tree is None or installed_version(venv) is None:
        return None
    return venv_python(venv), tree


def build(venv: str = DEFAULT_VENV, version: str = VERSION, log=print) -> tuple[str, str]:
    """Create VENV, download the llama-cpp-python sdist into VENV/src, extract it and pip-install
    it from there (CPU build, `nice -n 19`). Idempotent: finished steps are skipped. A VENV that
    already has llama-cpp-python (yours) keeps it: only the sdist of its version is fetched,
    for the converter."""
    py = venv_python(venv)
    if not os.path.exists(py):
        log(f"creating {venv}")
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", venv], check=True)
    version = installed_version(venv) or version
    src = os.path.join(venv, "src")
    os.makedirs(src, exist_ok=True)
    tarball = os.path.join(src, f"llama_cpp_python-{version}.tar.gz")
    tree = os.path.join(src, f"llama_cpp_python-{version}")
    if not os.path.exists(tarball):
        log(f"downloading the llama-cpp-python {version} sdist")
        subprocess.run(
            [py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", src],
            check=True,
        )  # fmt: skip
    if not os.path.isdir(tree):
        with tarfile.open(tarball) as tf:
            tf.extractall(src, filter="data")
    if installed_version(venv) != version:
        log(f"building llama-cpp-python {version} (CPU, gcc + cmake, ~8 min on 2 cores); "
            f"log: {venv}/build.log")  # fmt: skip
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        with open(os.path.join(venv, "build.log"), "w") as f:
            r = subprocess.run(
                ["nice", "-n", "19", py, "-m", "pip", "install", tree],
                env=env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"llama-cpp-python build failed; see {venv}/build.log")
    found = find(venv)
    assert found is not None
    return found


# ------------------------------------------------------------------------------- conversion
# Run by the project's python: llama.cpp's converter with one addition. Its pre-tokenizer table
# (`get_vocab_base_pre`) knows tokenizers by the hash of a test string's tokens; nanoseek's own
# byte-level BPE (digits split one by one, then GPT-2's byte-level regex) is not in it, but it is
# exactly what llama.cpp implements as "smollm" (`\p{N}` isolated, then the GPT-2 pattern). The
# patch answers "smollm" only for a tokenizer.json whose pre-tokenizer is that sequence.
_CONVERT = r"""
import json, os, runpy, sys
tree, model_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
sys.path.insert(1, os.path.join(tree, "gguf-py"))
import conversion.base as base

def single_digit_byte_level(model_dir):
    try:
        with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
            pre = json.load(f).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"]:
        return False
    pattern = steps[0].get("pattern", {}).get("Regex")
    return pattern in ("\\p{N}{1,1}", "\\p{N}") and steps[0].get("behavior") == "Isolated"

original = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        if single_digit_byte_level(model_dir):
            print("nanoseek tokenizer: registered as llama.cpp's 'smollm' pre-tokenizer",
                  file=sys.stderr)
            return "smollm"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [os.path.join(tree, "convert_hf_to_gguf.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(model_dir: str, out: str, outtype: str, tree: str, log_path: str) -> str:
    """Convert the HF checkpoint MODEL_DIR to the GGUF file OUT (outtype f32, bf16 or q8_0) with
    llama.cpp's converter, unless OUT exists. Runs with the project's python (sys.executable)."""
    if os.path.exists(out):
        return out
    tmp = out + ".tmp"
    with open(log_path, "a") as f:
        r = subprocess.run(
            ["nice", "-n", "19", sys.executable, "-c", _CONVERT, tree, model_dir,
             "--outtype", outtype, "--outfile", tmp],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({outtype}); see {log_path}")
    os.replace(tmp, out)
    return out


def gguf_tensors(path: str, tree: str) -> list[tuple[str, int]]:
    """(name, bytes) of every tensor in a GGUF file, read with the source tree's gguf-py."""
    sys.path.insert(0, os.path.join(tree, "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    return [(t.name, int(t.n_bytes)) for t in GGUFReader(path).tensors]


def gguf_bytes_per_token(tensors, n_routed: int, top_k: int, vocab: int) -> float:
    """Bytes of weights one decode step reads from a GGUF: every tensor, except that stacked
    routed experts (`*_exps`) count top_k / n_routed of their bytes and the token embedding one
    row of vocab."""
    total = 0.0
    for name, n in tensors:
        if "_exps" in name:
            total += n * top_k / n_routed
        elif name.startswith("token_embd"):
            total += n / vocab
        else:
            total += n
    return total


# ------------------------------------------------------------------------------- the worker
class Worker:
    """The bench's handle on a `worker` process (the llama venv's python)."""

    def __init__(self, python: str, stderr_path: str):
        self._err = open(stderr_path, "a")
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
        )  # fmt: skip
        self.info = self.call(op="hello")

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker died; see {self._err.name}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"llama.cpp worker: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._err.close()


def _worker() -> None:  # pragma: no cover - runs in the llama venv
    try:  # Linux: end with the bench (PR_SET_PDEATHSIG), even in the middle of a generation
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    # replies go to the original stdout; llama.cpp's own prints (fd 1) join its log on stderr
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import llama_cpp as L

    @L.llama_log_callback
    def log(level, text, user_data):  # llama-cpp-python's own callback fails on split UTF-8
        sys.stderr.write(text.decode("utf-8", "replace"))

    L.llama_log_set(log, None)
    L.llama_backend_init()
    state: dict = {}

    def unload():
        if "smpl" in state:
            L.llama_sampler_free(state.pop("smpl"))
        if "ctx" in state:
            L.llama_free(state.pop("ctx"))
        if "model" in state:
            L.llama_model_free(state.pop("model"))

    def load(path, n_ctx, threads, extra_bufts=False, f32_cache=False):
        unload()
        mp = L.llama_model_default_params()
        # the extra buffer types repack q8_0 weights for AMX / AVX kernels; with them on, this
        # build aborts on the DeepSeek graph (GGML_ASSERT(*cur_backend_id != -1), ggml-backend.cpp)
        mp.use_extra_bufts = extra_bufts
        model = L.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"cannot load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        if f32_cache:  # the latent cache in f32 instead of llama.cpp's default f16
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("cannot create a context")
        state.update(model=model, ctx=ctx, smpl=L.llama_sampler_init_greedy())
        return {"n_vocab": L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))}

    def tokenize(text):
        vocab = L.llama_model_get_vocab(state["model"])
        buf = (L.llama_token * (len(text.encode()) + 8))()
        raw = text.encode()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
        return list(buf[:n])

    def generate(prompt, n):
        ctx, smpl = state["ctx"], state["smpl"]
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        L.llama_sampler_reset(smpl)
        ids = (L.llama_token * len(prompt))(*prompt)
        one = (L.llama_token * 1)()
        out = []
        t0 = time.perf_counter()
        if L.llama_decode(ctx, L.llama_batch_get_one(ids, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        for i in range(n):  # greedy, eos ignored: every run yields n tokens
            tok = L.llama_sampler_sample(smpl, ctx, -1)
            out.append(tok)
            if i == n - 1:
                break
            one[0] = tok
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
        return {"tokens": out, "seconds": time.perf_counter() - t0}

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd.pop("op")
            if op == "hello":
                res = {"version": L.__version__,
                       "system": L.llama_print_system_info().decode().strip()}  # fmt: skip
            elif op == "load":
                res = load(**cmd)
            elif op == "threads":
                L.llama_set_n_threads(state["ctx"], cmd["threads"], cmd["threads"])
                res = {}
            elif op == "tokenize":
                res = {"tokens": tokenize(cmd["text"])}
            elif op == "generate":
                res = generate(cmd["prompt"], cmd["n"])
            else:
                res = {"error": f"unknown op {op!r}"}
        except Exception as e:  # reported to the bench, which raises
            res = {"error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(res) + "\n")
        reply.flush()
    unload()


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["build", "where", "worker"])
    p.add_argument("--llama-venv", default=DEFAULT_VENV)
    p.add_argument("--version", default=VERSION)
    args = p.parse_args(argv)
    if args.what == "worker":
        _worker()
    elif args.what == "build":
        py, tree = build(args.llama_venv, args.version)
        print(f"python: {py}\nllama.cpp source: {tree}")
    else:
        found = find(args.llama_venv)
        if found is None:
            sys.exit(f"no llama-cpp-python in {args.llama_venv}: run `{sys.argv[0]} build`")
        print(f"python: {found[0]}\nllama.cpp source: {found[1]}")


if __name__ == "__main__":
    main()
