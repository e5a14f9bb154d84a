"""Time and memory per update of `micro_batches=k` against Keras's `gradient_accumulation_steps=k`.

The token language model of tests/training/test_accumulation.py at a larger size:
Embedding(2000, 128, mask_zero=True) + Dense(2000) on sequences of 64 tokens
(8 to 64 valid, padded with 0), Keras's
`SparseCategoricalCrossentropy(from_logits=True)` through the mask, SGD
with momentum 0.9. One update is a batch of k x 16 = 64 sequences (a
micro-step of 16 takes 20-50 ms on a 2-core AMD EPYC), in three
configurations of the same model:

  keras     `fit(batch_size=16)`, `SGD(..., gradient_accumulation_steps=4)`:
            four steps of `fit` per update
  package   `keras_batchfix.Model`, `compile(..., micro_batches=4)`,
            `fit(batch_size=64)`: one step of `fit`, run as four slices
  one pass  `fit(batch_size=64)`, no accumulation (for scale: it holds the
            activations of 64 sequences at once)

Time: each round runs `fit` once per configuration over `--updates` updates,
the configurations in turn (`harness.interleaved_times`); a callback stamps
the end of every update, and the round's value is the mean time of the
updates after the first (the first carries `fit`'s set-up). Keras logs
every step, so `fit` waits for each step's result (as with a progress bar):
that is part of the time of both configurations. Printed: the median and
the interquartile range over rounds, and the ratio package / keras as the
median of the rounds' ratios, with their range.

Memory, in bytes of the model's parameters (P, one gradient-sized buffer):

  * held for all of training: the optimizer's variables. Keras's
    accumulation adds one accumulator per weight (P); `micro_batches` none.
  * held during an update: by design the package sums the slices' gradients
    into one buffer per group of loss terms (terms that share a count and a
    normalizer; this model's one loss is one group): P, freed after the
    update (keras_batchfix/training/accumulation.py). Measured on torch as the
    largest rise of the resident set during one update above its level
    before (`harness.peak_step_bytes`, in a worker of its own), and on JAX
    as XLA's scratch memory of the compiled train step
    (`memory_analysis().temp_size_in_bytes`, exact; the resident set does
    not follow it there: in our runs it rose by less than XLA's scratch).
    TensorFlow's allocator keeps the memory it has freed: no measure.
    Both measures also hold the activations of the micro-batches.

Targets of issue 26: the package's update at most 1.05x Keras's, and at most
one extra gradient-sized buffer. Printed as met or missed; nothing asserts
a time.

    python benchmarks/accumulation_speed.py                  # 3 backends, 15 rounds
    python benchmarks/accumulation_speed.py --backends torch --repeats 31
    python benchmarks/accumulation_speed.py --quick          # tiny sizes, a smoke run (< 30 s)
    python benchmarks/accumulation_speed.py --threads 0      # the frameworks' own thread counts
"""

import argparse
import os
import statistics
import time

from keras_batchfix.references.machine import cpu_name
from harness import emit, interleaved_times, peak_step_bytes, run_worker

CONFIGS = ("keras", "package", "one pass")


def token_batches(args, seed=0):
    """`args.updates` updates' sequences: 8..length tokens, padded with 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    count = args.updates * args.micro_batch * args.steps
    x = np.zeros((count, args.length), "int32")
    lengths = rng.integers(min(8, args.length), args.length + 1, count)
    for row, length in enumerate(lengths):
        x[row, :length] = rng.integers(1, args.vocab, length)
    y = np.roll(x, -1, axis=1)
    y[:, -1] = 0
    return x, y


def build(name, args):
    import keras

    import keras_batchfix

    inputs = keras.Input((args.length,), dtype="int32")
    hidden = keras.layers.Embedding(args.vocab, args.hidden, mask_zero=True)(inputs)
    model_class = keras_batchfix.Model if name == "package" else keras.Model
    model = model_class(inputs, keras.layers.Dense(args.vocab)(hidden))
    steps = args.steps if name == "keras" else None
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, gradient_accumulation_steps=steps)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    extra = {"micro_batches": args.steps} if name == "package" else {}
    model.compile(optimizer, loss, **extra)
    return model


def limit_threads(threads):
    """`threads` intra-op threads for torch and TensorFlow (0: their defaults).

    On a shared 2-core machine torch's OpenMP threads stall whenever the
    other core is busy (a tiny step took 1.6 ms with one thread and 75-80 ms
    with two). XLA's CPU thread flags had no effect on jaxlib 0.10.2 (CPU
    time twice the wall time with and without them): JAX keeps its pool.
    """
    import keras

    if not threads:
        return
    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def worker(args):
    """In a child process: times (or measures the memory of) every configuration."""
    import keras
    import numpy as np

    limit_threads(args.threads)

    x, y = token_batches(args)
    batch = args.micro_batch * args.steps
    models = {name: build(name, args) for name in CONFIGS}
    fit_batch = {"keras": args.micro_batch, "package": batch, "one pass": batch}

    class UpdateClock(keras.callbacks.Callback):
        def __init__(self, steps_per_update):
            super().__init__()
            self.steps_per_update = steps_per_update

        def on_train_begin(self, logs=None):
            self.steps, self.stamps = 0, []

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if self.steps % self.steps_per_update == 0:
                self.stamps.append(time.perf_counter())

    def timed_fit(name):
        clock = UpdateClock(batch // fit_batch[name])

        def step():
            models[name].fit(x, y, batch_size=fit_batch[name], epochs=1, shuffle=False,
                             verbose=0, callbacks=[clock])
            return (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)

        return step

    def one_update(name):
        """One update by `train_on_batch` (for the memory pass)."""
        size = fit_batch[name]

        def step():
            for start in range(0, batch, size):
                models[name].train_on_batch(x[start:start + size], y[start:start + size])

        return step

    def nbytes(variables):
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    result = {"parameters": nbytes(models["keras"].trainable_weights), "device": device()}
    if not args.memory_only:
        result["times"] = interleaved_times(
            {name: timed_fit(name) for name in CONFIGS}, args.repeats, warmup=1,
            self_timed=True)
        result["state"] = {n: nbytes(models[n].optimizer.variables) for n in CONFIGS}
    if args.memory:
        result.update(peak={}, xla_temp={})
        for name in CONFIGS:
            step = one_update(name)
            step(), step()  # builds the optimizer and traces the step
            if keras.backend.backend() == "torch" and result["device"] == "CPU":
                result["peak"][name] = peak_step_bytes(step)  # host memory only
            if keras.backend.backend() == "jax":
                result["xla_temp"][name] = xla_temp_bytes(models[name], x[:fit_batch[name]])
    emit(result)


def device():
    """What the running backend computes on: "CPU", or the accelerator's name."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if backend == "jax":
        import jax

        first = jax.devices()[0]
        return "CPU" if first.platform == "cpu" else first.device_kind
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name if gpus else "CPU"


def xla_temp_bytes(model, x):
    """XLA's scratch memory of one compiled `train_step` of `model` (JAX)."""
    import jax

    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    compiled = jax.jit(model.train_step).lower(state, (x, x)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def quartiles(values):
    values = sorted(values)
    if len(values) < 4:
        return values[0], statistics.median(values), values[-1]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--updates", type=int, default=9, help="updates per round")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="k: micro-batches per update")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and TensorFlow threads (0: their defaults)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.length, args.micro_batch = 50, 8, 12, 4
        args.repeats, args.updates = 2, 3
    if args.updates < 2:
        parser.error("--updates must be at least 2 (the first update of a round is not timed)")
    if args.worker:
        return worker(args)

    arguments = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("repeats", "updates", "vocab", "hidden", "length", "micro_batch", "steps",
                  "threads")]
    script = os.path.abspath(__file__)
    # --quick measures memory in the timing workers (a smoke run of the code);
    # otherwise in workers of their own (see `harness.peak_step_bytes`).
    results = {b: run_worker(script, b, arguments + ["--memory"] * args.quick)
               for b in args.backends}
    if not (args.quick or args.no_memory):
        for backend in args.backends:
            if backend != "tensorflow":  # no measure: its allocator keeps freed memory
                memory = run_worker(script, backend, [*arguments, "--memory", "--memory-only"],
                                    memory=True)
                results[backend].update(peak=memory["peak"], xla_temp=memory["xla_temp"])
    report(args, results)


def report(args, results):
    mib = 2.0**20
    batch = args.micro_batch * args.steps
    size = next(iter(results.values()))["parameters"]
    print(f"Time and memory per update: Embedding({args.vocab}, {args.hidden}, mask_zero=True) "
          f"+ Dense({args.vocab}), sequences of {args.length}; an update = {args.steps} x "
          f"{args.micro_batch} = {batch} sequences; {args.repeats} rounds of {args.updates} "
          f"updates; torch/TF threads {args.threads or 'default'}; {cpu_name()}")
    print(f"P = parameter bytes = one gradient-sized buffer = {size / mib:.2f} MiB. "
          "opt. state: the optimizer's variables; peak: the largest rise of the resident set "
          "in one update (torch on CPU); XLA temp: scratch memory of one compiled train step (JAX)")
    print(f"{'backend':<11} {'config':<9} {'ms/update':>9} {'IQR':>13} {'/ keras':>7} "
          f"{'range':>11} {'opt. state':>10} {'peak':>10} {'XLA temp':>10}")
    verdicts = []
    for backend, result in results.items():
        times = result["times"]
        if result["device"] != "CPU":
            print(f"{backend} computes on {result['device']}")
        for name in CONFIGS:
            q1, q2, q3 = quartiles(times[name])
            paired = [p / q for p, q in zip(times[name], times["keras"])]
            peak = result.get("peak", {}).get(name)
            temp = result.get("xla_temp", {}).get(name)
            print(f"{backend:<11} {name:<9} {q2 * 1e3:>9.1f} {q1 * 1e3:>6.1f}-{q3 * 1e3:<6.1f} "
                  f"{statistics.median(paired):>7.3f} {min(paired):>5.2f}-{max(paired):<5.2f} "
                  + " ".join(f"{'-' if v is None else f'{v / mib:.1f} MiB':>10}"
                             for v in (result["state"][name], peak, temp)))
        ratios = sorted(p / q for p, q in zip(times["package"], times["keras"]))
        ratio = statistics.median(ratios)
        verdicts.append(
            f"{backend}: time package / keras {ratio:.3f} (rounds {ratios[0]:.2f}-"
            f"{ratios[-1]:.2f}): target <= 1.05 {'met' if ratio <= 1.05 else 'MISSED'}")
        state = {n: (result["state"][n] - result["state"]["one pass"]) / size for n in CONFIGS}
        line = (f"{backend}: memory beyond one pass held for all of training: keras "
                f"{state['keras']:+.2f} P (its accumulators), package {state['package']:+.2f} P")
        temp = result.get("xla_temp") or {}
        peak = result.get("peak") or {}
        if temp:
            extra = (temp["package"] - temp["keras"]) / size
            line += (f"; during an update, XLA temp package - keras {extra:+.1f} P: target "
                     f"<= 1 extra gradient-sized buffer {'met' if extra <= 1.5 else 'MISSED'}")
        elif peak:
            extra = (peak["package"] - peak["keras"]) / size
            line += (f"; during an update, peak package - keras {extra:+.1f} P: target <= 1 "
                     f"extra gradient-sized buffer {'met' if extra <= 1.5 else 'MISSED'}")
        verdicts.append(line)
    print("\n".join(verdicts))
    if args.quick:
        print("--quick: tiny sizes and memory measured in the timing workers; the numbers "
              "check that the script runs, they measure nothing.")
    print("By design (keras_batchfix/training/accumulation.py) the package holds during an update one "
          "gradient sum per group of loss terms (this model: one group, 1 P), freed after it, "
          "where Keras's accumulation holds 1 P for all of training; a 'MISSED' memory target "
          "means the measure found more than that (the 1.5 P threshold allows for rounding).")


if __name__ == "__main__":
    main()
