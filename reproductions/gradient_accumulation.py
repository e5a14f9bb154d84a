"""Gradient accumulation with a token loss: Keras's `gradient_accumulation_steps=4`
is not one pass over batches of 32; `keras_batchfix.Model` with `micro_batches=4` is.

You want updates on batches of 32 sequences but only 8 fit in memory. With
Keras you write `fit(batch_size=8)` and `SGD(..., gradient_accumulation_steps=4)`:
the optimizer applies the mean of four micro-steps' gradients. With a loss
that is a mean over the valid (non-padding) tokens, each micro-batch divides
by its own token count, so tokens of short micro-batches weigh more; and a
learning-rate schedule counts micro-steps, so a decay meant for update N
comes at update N / 4. With `keras_batchfix.Model(...).compile(...,
micro_batches=4)` you write `fit(batch_size=32)`: each batch runs as four
slices of 8 (forward and backward each), the gradients of the loss's
numerator and the token counts are summed over the slices and divided once.

Model: Embedding(50, 16, mask_zero=True) + Dense(50), next-token prediction
on 124 sequences of 3..12 random tokens padded with 0 (the loss can only fall
from ln 50 = 3.91 to about 3.7: the model learns where sequences end); loss
`SparseCategoricalCrossentropy(from_logits=True)`, a mean over the valid
tokens through the mask. SGD, momentum 0.9, learning rate 0.5, then 0.05
for the second half of the updates. All runs start from the same weights and
see the same sequences in the same order (one permutation per epoch from a
fixed seed, on every backend); 124 = 15 x 8 + 4, so Keras's windows of four
micro-batches (which run on across epochs) hold the sequences of (a)'s batches:

  (a)  batches of 32, one pass each (the last of each epoch has 28)
  (b)  Keras: batches of 8, `SGD(..., gradient_accumulation_steps=4)`
  (b') (b) with the schedule's boundary counted in micro-steps (x 4): what
       remains is the mean of the micro-batches' means
  (c)  `keras_batchfix.Model`: batches of 32, `compile(..., micro_batches=4)`

    python reproductions/gradient_accumulation.py           # 3 backends, 10 epochs
    python reproductions/gradient_accumulation.py --quick   # 3 epochs (the tests)
    python reproductions/gradient_accumulation.py --backend jax --out /tmp/acc

Writes updates.csv (per backend, run and update), table.csv, table.md and
gradient_accumulation.png to --out (default results/gradient_accumulation/,
with --quick results/gradient_accumulation_quick/).
The committed results: the default command, 2-core AMD EPYC virtual machine,
CPU only, no GPU, for TensorFlow 2.21.0, JAX 0.10.2 and torch 2.13.0 under
Keras 3.15.1 (run.log): on every backend (b) ends 0.78 of (a)'s weight change
away from (a), (b') 0.040, (c) 0.9e-7 to 5.5e-7 (float32 rounding).
"""

import argparse
import os
import sys
import time

from keras_batchfix.references.machine import cpu_name
from support.backends import (BACKENDS, ROOT, device_and_version, emit, run_worker,
                              write_csv)

HIDDEN = 16
BATCH, K = 32, 4  # the batch of one update, and the micro-batches it is run as
RUNS = {
    "a": "(a) one pass: batches of 32",
    "b": "(b) Keras: batches of 8, gradient_accumulation_steps=4",
    "b'": "(b') as (b), schedule boundary x 4 (in micro-steps)",
    "c": "(c) keras_batchfix.Model: batches of 32, micro_batches=4",
}


def train(epochs):
    """Runs every run on the current backend; one row per run and update."""
    import keras
    import numpy as np

    import keras_batchfix
    from keras_batchfix.references.token_data import LENGTH, SEQUENCES, VOCAB, token_data

    x, y = token_data()
    rng = np.random.default_rng(3)
    orders = [rng.permutation(SEQUENCES) for _ in range(epochs)]
    limit = np.sqrt(6 / (HIDDEN + VOCAB))  # Keras's initializers, drawn by NumPy
    initial = [rng.uniform(-0.05, 0.05, (VOCAB, HIDDEN)).astype("float32"),
               rng.uniform(-limit, limit, (HIDDEN, VOCAB)).astype("float32"),
               np.zeros(VOCAB, "float32")]
    decay_after = epochs * -(-SEQUENCES // BATCH) // 2  # updates at 0.5

    class Record(keras.callbacks.Callback):
        """The loss of every step and the weights after every update.

        `fit` logs the running mean of the epoch's step losses, weighted by
        batch size: a step's loss is recovered from two consecutive means.
        """

        def __init__(self, batch_size):
            super().__init__()
            self.batch_size, self.losses, self.weights = batch_size, [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.total, self.seen = 0.0, 0

        def on_train_batch_end(self, batch, logs=None):
            size = min(self.batch_size, SEQUENCES - batch * self.batch_size)
            total = float(logs["loss"]) * (self.seen + size)
            self.losses.append((total - self.total) / size)
            self.total, self.seen = total, self.seen + size
            if len(self.losses) % (BATCH // self.batch_size) == 0:  # an update
                self.weights.append(self.model.get_weights())

    def run(model_class, batch_size, boundary, steps=None, micro_batches=None):
        inputs = keras.Input((LENGTH,), dtype="int32")
        hidden = keras.layers.Embedding(VOCAB, HIDDEN, mask_zero=True)(inputs)
        model = model_class(inputs, keras.layers.Dense(VOCAB)(hidden))
        model.set_weights(initial)
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([boundary], [0.5, 0.05])
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9,
                                         gradient_accumulation_steps=steps)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        compile_args = dict(micro_batches=micro_batches) if micro_batches else {}
        model.compile(optimizer, loss, **compile_args)
        record = Record(batch_size)
        for order in orders:  # the same sequences in the same order for every run
            model.fit(x[order], y[order], batch_size=batch_size, epochs=1,
                      shuffle=False, verbose=0, callbacks=[record])
        micro_steps = steps or 1  # the schedule sees micro-steps under (b) and (b')
        record.rates = [float(schedule(micro_steps * u + micro_steps - 1))
                        for u in range(len(record.weights))]
        return record

    start = time.perf_counter()
    boundary = decay_after - 1  # a PiecewiseConstantDecay boundary is inclusive
    records = {
        "a": run(keras.Model, BATCH, boundary),
        "b": run(keras.Model, BATCH // K, boundary, steps=K),
        "b'": run(keras.Model, BATCH // K, K * decay_after - 1, steps=K),
        "c": run(keras_batchfix.Model, BATCH, boundary, micro_batches=K),
    }
    seconds = time.perf_counter() - start

    # The loss of an update: the mean cross-entropy over the valid tokens of
    # its 32 sequences, at the weights it starts from. (a) and (c) log that;
    # Keras logs each micro-step's own mean: weighted here by its tokens.
    tokens = np.concatenate([
        [(x[order[i:i + BATCH // K]] > 0).sum() for i in range(0, SEQUENCES, BATCH // K)]
        for order in orders]).reshape(-1, K)
    for name in ("b", "b'"):
        micro = np.reshape(records[name].losses, (-1, K))
        records[name].losses = list((micro * tokens).sum(1) / tokens.sum(1))

    def gap(one, other):
        return max(float(np.abs(p - q).max()) for p, q in zip(one, other))

    reference = records["a"].weights
    moved = gap(reference[-1], initial)
    rows = [dict(run=name, update=u + 1, learning_rate=record.rates[u],
                 loss=float(record.losses[u]), gap=gap(weights, reference[u]) / moved)
            for name, record in records.items() for u, weights in enumerate(record.weights)]
    last_epoch = -(-SEQUENCES // BATCH)  # updates
    summary = dict(updates=len(reference), moved=moved, decay_after=decay_after)
    for name, record in records.items():
        summary[f"gap {name}"] = gap(record.weights[-1], reference[-1]) / moved
        summary[f"loss {name}"] = float(np.mean(record.losses[-last_epoch:]))
    return dict(rows=rows, summary=summary, seconds=seconds)


def write_table(results, epochs, out, hardware):
    """updates.csv and table.csv (every number), and table.md; prints the table."""
    write_csv(os.path.join(out, "updates.csv"),
              [dict(backend=b, **row) for b, r in results.items() for row in r["rows"]])
    table = [dict(backend=b, device=r["device"], **r["summary"]) for b, r in results.items()]
    write_csv(os.path.join(out, "table.csv"), table)
    lines = [
        f"{hardware}. {epochs} epochs ({table[0]['updates']} updates), learning rate 0.5, "
        f"then 0.05 after update {table[0]['decay_after']}. Gap: the largest weight "
        "difference to (a) after the last update, over the largest change of (a)'s weights "
        "((a) moved). Loss: the mean over the last epoch's updates.",
        "",
        "| backend | device | (a) moved | (b) Keras: gap | (b') Keras, schedule x 4: gap "
        "| (c) `micro_batches=4`: gap | loss (a) / (b) / (b') / (c) |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {t['backend']} | {t['device']} | {t['moved']:.3f} | "
         + " | ".join(f"{t['gap ' + name]:.{'1e' if name == 'c' else '3f'}}" for name in list(RUNS)[1:])
         + " | " + " / ".join(f"{t['loss ' + name]:.4f}" for name in RUNS) + " |" for t in table]
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


def plot(results, table, out, hardware):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = {"a": "black", "b": "tab:red", "b'": "tab:orange", "c": "tab:green"}
    dashes = dict(zip(BACKENDS, ("-", "--", ":")))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4))
    first = next(iter(results))
    for backend, result in results.items():
        for name in RUNS:
            rows = [r for r in result["rows"] if r["run"] == name]
            updates = [r["update"] for r in rows]
            style = dict(marker="o", ms=5, mfc="none", lw=0) if name == "c" else {}
            if backend == first:
                left.plot(updates, [r["loss"] for r in rows], color=colors[name], **style)
            if name != "a":
                right.semilogy(updates, [max(r["gap"], 1e-9) for r in rows],
                               color=colors[name], ls=dashes[backend])
    zero = any(r["gap"] == 0 for result in results.values() for r in result["rows"]
               if r["run"] != "a")
    rows = results[first]["rows"]
    spread = max(abs(r["loss"] - s["loss"]) for result in results.values()
                 for r, s in zip(result["rows"], rows))
    for name, color in (("a", "0.5"), ("b", "tab:red")):  # the learning rate's decay
        decay = min(r["update"] for r in rows if r["run"] == name and r["learning_rate"] < 0.1)
        for ax in (left, right):
            ax.axvline(decay - 0.5, color=color, ls=":", lw=1)
    left.set(xlabel="update (4 per epoch)",
             title=f"Loss per update on {first} (other backends within {spread:.0e})",
             ylabel="loss of the update's 32 sequences\n(mean over valid tokens, before the update)")
    right.set(xlabel="update (4 per epoch)", title="Weight gap to one pass (a), every backend",
              ylabel="largest weight gap to (a) / how far (a) moved"
              + ("\n(a gap of 0 is drawn at 1e-9)" if zero else ""))
    runs = [Line2D([], [], color=colors[n], marker="o" if n == "c" else None,
                   mfc="none", lw=0 if n == "c" else 1.5, label=label)
            for n, label in RUNS.items()]
    runs += [Line2D([], [], color="0.5", ls=":", label="learning rate 0.5 -> 0.05: (a), (b'), (c)"),
             Line2D([], [], color="tab:red", ls=":", label="learning rate 0.5 -> 0.05: (b)")]
    backends = [Line2D([], [], color="0.3", ls=dashes[b], label=b) for b in results]
    fig.legend(handles=runs, loc="lower left", ncol=2, fontsize=9, frameon=False,
               bbox_to_anchor=(0.03, 0.03))
    fig.legend(handles=backends, loc="lower right", ncol=1, fontsize=9, frameon=False,
               title="backend (right panel)", title_fontsize=9, bbox_to_anchor=(0.97, 0.03))
    worst_b = min(t["gap b"] for t in table)
    worst_c = max(t["gap c"] for t in table)
    fig.suptitle(f"Keras's gradient_accumulation_steps=4 is not one pass over batches of 32 "
                 f"(final weight gap {worst_b:.2f} of how far (a) moved);\nkeras_batchfix's "
                 f"micro_batches=4 is, to float32 rounding (gap at most {worst_c:.0e})"
                 .replace("e-0", "e-"), fontsize=11)
    fig.text(0.5, 0.005, hardware, ha="center", va="bottom", fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(os.path.join(out, "gradient_accumulation.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, help="one backend (default: all three)")
    parser.add_argument("--epochs", type=int, help="default 10 (--quick: 3)")
    parser.add_argument("--quick", action="store_true", help="3 epochs, for the tests")
    parser.add_argument("--out", help="default results/gradient_accumulation "
                        "(--quick: results/gradient_accumulation_quick)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 10)
    args.out = args.out or os.path.join(ROOT, "reproductions", "results",
                                        "gradient_accumulation" + "_quick" * args.quick)
    if args.worker:
        import keras

        result = train(epochs)
        result["device"], result["version"] = device_and_version(args.worker)
        return emit(dict(result, keras=keras.__version__))

    os.makedirs(args.out, exist_ok=True)
    print(f"Token model, {epochs} epochs, on a {cpu_name()}; each backend in its own process")
    results = {}
    for backend in [args.backend] if args.backend else BACKENDS:
        start = time.perf_counter()
        results[backend] = run_worker(__file__, backend, ["--epochs", str(epochs)])
        print(f"  {backend} on {results[backend]['device']}: {time.perf_counter() - start:.1f} s "
              f"({results[backend]['seconds']:.1f} s training)", flush=True)
    versions = ", ".join(f"{b} {r['version']}" for b, r in results.items())
    devices = ", ".join(f"{b} on {r['device']}" for b, r in results.items())
    hardware = (f"{cpu_name()}; {devices}; Keras {results[backend]['keras']}, {versions}")
    table = write_table(results, epochs, args.out, hardware)
    plot(results, table, args.out, hardware)
    print(f"Wrote updates.csv, table.csv, table.md and gradient_accumulation.png to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
