"""Shared timing helpers: medians, and one child process per Keras backend."""

import json
import os
import statistics
import subprocess
import sys
import time



def interleaved_medians(steps, repeats, warmup=2):
    """`{name: median wall time of steps[name]()}`, the steps taken in turn.

    After `warmup` calls of each, every round calls each step once, so drift
    of a shared machine (other work, clock changes) reaches all steps alike
    and cancels in their ratios.
    """
    times = interleaved_times(steps, repeats, warmup)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(steps, repeats, warmup=2, self_timed=False):
    """`{name: [seconds of each round]}`, taken as `interleaved_medians` takes them.

    With `self_timed=True` each step returns the seconds it measured itself
    (a part of its call, e.g. the steps of a `fit` after its set-up);
    otherwise the wall time of the call is taken.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            measured = step()
            elapsed = time.perf_counter() - start
            times[name].append(float(measured) if self_timed else elapsed)
    return times


def peak_step_bytes(step, repeats=3):
    """Largest rise of the resident set during `step()` above its level before.

    Linux only: the kernel's high-water mark is reset before each call
    (`/proc/self/clear_refs`). Run it in a worker started with
    `run_worker(..., memory=True)`, where glibc's mmap threshold is fixed so
    that every large buffer is mapped on allocation and unmapped when freed:
    the resident set then follows the live buffers, whichever framework
    allocates them. (That slows large allocations down: never time steps in
    such a worker.) Call after a warm-up. NaN where unsupported.
    """
    peak = float("nan")
    for _ in range(repeats):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            before = _status_kib("VmRSS")
            step()
            rise = (_status_kib("VmHWM") - before) * 1024.0
        except OSError:
            return float("nan")
        peak = rise if peak != peak else max(peak, rise)
    return peak


def _status_kib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def torch_device():
    """Where torch steps run: the GPU when there is one, as Keras's torch backend."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_synchronized(step):
    """`step`, then a wait for the GPU: torch returns before CUDA kernels end.

    On CPU `step` itself is returned.
    """
    import torch

    if not torch.cuda.is_available():
        return step

    def synchronized():
        step()
        torch.cuda.synchronize()

    return synchronized


def emit(results):
    """Prints a worker's results for `run_worker` to read."""
    print("RESULT " + json.dumps(results), flush=True)


def run_worker(script, backend, arguments, memory=False):
    """Runs `script --worker BACKEND ARGUMENTS` and returns what it emitted.

    `backend` is a Keras backend name, or "reference" for the PyTorch
    reference (no Keras backend is set then). `memory=True` fixes glibc's
    mmap threshold for `peak_step_bytes`.
    """
    # On a GPU, JAX would otherwise take 75% of its memory up front, leaving
    # little to the torch reference timed in the same process.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if backend != "reference":
        env["KERAS_BACKEND"] = backend
    command = [sys.executable, script, "--worker", backend, *arguments]
    what = "memory of" if memory else "timing"
    print(f"{what} {backend} ...", file=sys.stderr, flush=True)
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{backend} benchmark failed:\n{out.stderr[-3000:]}")


def value_and_grad_steps(fn, argument, constants=()):
    """`{mode: step}` timing forward + backward of `fn(*constants, argument)`.

    Modes are the running backend's: TF eager, tf.function and XLA; JAX jit;
    torch eager.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        constants = [tf.constant(c) for c in constants]
        argument = tf.constant(argument)

        def step(argument):
            with tf.GradientTape() as tape:
                tape.watch(argument)
                value = fn(*constants, argument)
            return value, tape.gradient(value, argument)

        compiled = {
            "tf eager": step,
            "tf.function": tf.function(step),
            "tf XLA": tf.function(step, jit_compile=True),
        }
        # TensorFlow runs eagerly and in sync on CPU: a call returns when its
        # outputs are computed. Only the scalar is converted: `.numpy()` of
        # the gradient would copy it (2.5 ms for SSD300's 28 MB at B = 32),
        # work the other frameworks' steps do not do.
        return {
            mode: (lambda f=f: f(argument)[0].numpy())
            for mode, f in compiled.items()
        }
    if backend == "jax":
        import jax

        constants = [jax.numpy.asarray(c) for c in constants]
        argument = jax.numpy.asarray(argument)
        # The constants are arguments, as in a train step: closed over, they
        # would be baked into the program (and constant-folded by XLA).
        jitted = jax.jit(jax.value_and_grad(lambda a, *c: fn(*c, a)))
        return {"jax jit": lambda: jax.block_until_ready(jitted(argument, *constants))}
    if backend == "torch":
        import torch

        device = torch_device()
        constants = [torch.as_tensor(c, device=device) for c in constants]

        def step():
            a = torch.tensor(argument, requires_grad=True, device=device)
            fn(*constants, a).backward()

        return {"torch eager": torch_synchronized(step)}
    raise NotImplementedError(backend)
