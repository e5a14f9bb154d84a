"""Audit: does each keras-hub task's training loss depend on the batch, the replicas or accumulation?

keras-hub's tasks get their loss from a few places: a family's `compile`
(`CausalLM`, `Seq2SeqLM`, `TextClassifier`, `MaskedLM`, `ImageClassifier`,
`ImageSegmenter`, `DepthEstimator`, `ObjectDetector`), a task's own
`compile` with another default loss, or a task's own `compute_loss`. This
script groups every task class of the installed keras-hub by the methods
that define its loss (the most derived `compute_loss`, `compile` and
`train_step` below `keras_hub.models.Task`), builds one task of each group it
can build from a small config with random weights (nothing is downloaded),
and runs `keras_batchfix.diagnose_model` on one batch of it: the batch
exponent, the replica factor on an equal and on an unequal split over 2
simulated replicas, and the accumulation factor over 2 micro-batches.

    python reproductions/keras_hub_audit.py            # every group; writes the table into docs/keras_hub.md
    python reproductions/keras_hub_audit.py --quick    # two tasks, no docs (what the test runs)

Options: `--tasks NAME,...` (the built tasks to run), `--out DIR` (the table
and a CSV; default `reproductions/results/keras_hub_audit`), `--no-docs`.
The numbers are deterministic for a given keras-hub, Keras and backend
(random weights from fixed seeds).
"""

import argparse
import csv
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "keras_hub.md")
BEGIN, END = "<!-- audit table: begin -->", "<!-- audit table: end -->"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_batchfix  # noqa: E402

try:
    import keras_hub  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit("keras_hub_audit.py needs keras-hub: pip install 'keras-batchfix[keras-hub]'")

RNG_SEED = 0


def _rng():
    return np.random.default_rng(RNG_SEED)


def _tokens(n=4, length=8, vocab=40, min_length=3):
    """Token ids padded with 0 and their padding mask; lengths differ."""
    rng = _rng()
    ids = np.zeros((n, length), "int32")
    for row, k in enumerate(rng.integers(min_length, length + 1, n)):
        ids[row, :k] = rng.integers(1, vocab, k)
    return ids, (ids > 0).astype("int32")


def _resnet(size, filters=(64, 8)):
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=list(filters), stackwise_num_blocks=[1] * len(filters),
        stackwise_num_strides=[1] + [2] * (len(filters) - 1), block_type="basic_block",
        use_pre_activation=False, image_shape=(size, size, 3),
    )


def _freeze_batch_norms(layer):
    for sublayer in getattr(layer, "layers", ()):
        if isinstance(sublayer, keras.layers.BatchNormalization):
            sublayer.trainable = False
        _freeze_batch_norms(sublayer)


# Each builder returns (model, x, y, backbone config in words).

def gpt2_causal_lm():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8, dropout=0.0)
    ids, mask = _tokens(length=9)
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return (keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None),
            x, ids[:, 1:], "GPT2Backbone: vocab 40, 1 layer, 2 heads, dim 8")


def gemma_causal_lm():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=40, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4)
    ids, mask = _tokens(length=9)
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return (keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None),
            x, ids[:, 1:], "GemmaBackbone: vocab 40, 1 layer, 2 query heads, dim 8")


def bart_seq2seq_lm():
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, dropout=0.0, max_sequence_length=9)
    enc, enc_mask = _tokens(length=8)
    dec, dec_mask = _tokens(length=9, min_length=4)
    x = {"encoder_token_ids": enc, "encoder_padding_mask": enc_mask,
         "decoder_token_ids": dec[:, :-1], "decoder_padding_mask": dec_mask[:, :-1]}
    return (keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None),
            x, dec[:, 1:], "BartBackbone: vocab 40, 1 layer, 2 heads, dim 8")


def bert_text_classifier():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, dropout=0.0, max_sequence_length=8)
    ids, mask = _tokens()
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}
    y = _rng().integers(0, 3, len(ids))
    return (keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3,
                                                preprocessor=None, dropout=0.0),
            x, y, "BertBackbone: vocab 40, 1 layer, 2 heads, dim 8; 3 classes")


def bert_masked_lm():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, dropout=0.0, max_sequence_length=8)
    ids, mask = _tokens()
    positions = np.tile(np.arange(2, dtype="int32"), (len(ids), 1))
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask,
         "mask_positions": positions}
    y = _rng().integers(1, 40, positions.shape)
    return (keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None),
            x, y, "BertBackbone: vocab 40, 1 layer, 2 heads, dim 8; 2 masked positions")


def resnet_image_classifier():
    images = _rng().uniform(size=(4, 16, 16, 3)).astype("float32")
    model = keras_hub.models.ResNetImageClassifier(backbone=_resnet(16), num_classes=3)
    _freeze_batch_norms(model)
    return (model, images, _rng().integers(0, 3, 4),
            "ResNetBackbone: 2 basic blocks (64, 8 filters; keras-hub needs 64 first), 16x16 images; 3 classes")


def deeplab_v3_image_segmenter():
    encoder = _resnet(16, filters=(64, 8, 8))
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder, spatial_pyramid_pooling_key="P3",
        upsampling_size=2, dilation_rates=[1, 2], low_level_feature_key="P2",
        projection_filters=8, image_shape=(16, 16, 3))
    model = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=3)
    _freeze_batch_norms(model)
    images = _rng().uniform(size=(4, 16, 16, 3)).astype("float32")
    return (model, images, np.eye(3, dtype="float32")[_rng().integers(0, 3, (4, 16, 16))],
            "DeepLabV3Backbone on a 3-stage ResNet (64, 8, 8 filters), 16x16 images; 3 classes")


def depth_anything_depth_estimator():
    encoder = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=2, hidden_dim=8, num_heads=2, intermediate_dim=16,
        image_shape=(28, 28, 3), position_embedding_shape=(28, 28, 3))
    backbone = keras_hub.models.DepthAnythingBackbone(
        image_encoder=encoder, reassemble_factors=[4, 2], neck_hidden_dims=[8, 8],
        fusion_hidden_dim=8, head_hidden_dim=8, head_in_index=-1,
        feature_keys=["stage1", "stage2"])
    model = keras_hub.models.DepthAnythingDepthEstimator(
        backbone=backbone, depth_estimation_type="metric", max_depth=3.0)
    images = _rng().uniform(size=(4, 28, 28, 3)).astype("float32")
    depths = _rng().uniform(0.5, 2.0, size=(4, 28, 28, 1)).astype("float32")
    return (model, images, depths,
            "DepthAnythingBackbone on a 2-layer DINOV2 (dim 8, patch 14), 28x28 images; metric depth, max 3")


def _boxes(n, size, slots=3, normalized=False):
    rng = _rng()
    boxes = np.zeros((n, slots, 4), "float32")
    labels = -np.ones((n, slots), "int32")
    for i in range(n):
        for j in range(rng.integers(1, slots + 1)):
            if normalized:  # center_xywh in [0, 1]
                boxes[i, j] = [*rng.uniform(0.3, 0.7, 2), *rng.uniform(0.2, 0.5, 2)]
            else:
                y0, x0 = rng.uniform(0, size / 2, 2)
                h, w = rng.uniform(size / 4, size / 2, 2)
                boxes[i, j] = [y0, x0, y0 + h, x0 + w]
            labels[i, j] = rng.integers(0, 3)
    return {"boxes": boxes, "labels": labels}


def _retinanet(cls):
    keras.utils.set_random_seed(RNG_SEED)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16, 16, 16], stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(64, 64, 3))
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=5, use_p5=False,
        image_shape=(64, 64, 3))
    anchors = keras_hub.layers.AnchorGenerator(
        bounding_box_format="yxyx", min_level=3, max_level=5, num_scales=1,
        aspect_ratios=[1.0], anchor_size=2)
    model = cls(backbone=backbone, num_classes=3, anchor_generator=anchors,
                bounding_box_format="yxyx")
    _freeze_batch_norms(model)
    images = _rng().uniform(size=(4, 64, 64, 3)).astype("float32")
    return (model, images, _boxes(4, 64),
            "RetinaNetBackbone (levels 3-5) on a 4-stage ResNet, 64x64 images; 3 classes")


def retinanet_object_detector():
    return _retinanet(keras_hub.models.RetinaNetObjectDetector)


def retinanet_fixed():
    from keras_batchfix.integrations.retinanet import RetinaNetObjectDetector

    return _retinanet(RetinaNetObjectDetector)


def _d_fine(cls):
    keras.utils.set_random_seed(RNG_SEED)
    encoder = keras_hub.models.HGNetV2Backbone(
        stem_channels=[3, 4, 4],
        stackwise_stage_filters=[[4, 4, 8, 1, 1, 3], [8, 4, 8, 1, 1, 3]],
        apply_downsample=[False, True], use_lightweight_conv_block=[False, False],
        depths=[1, 1], hidden_sizes=[8, 8], embedding_size=4,
        use_learnable_affine_block=True, hidden_act="relu",
        image_shape=(32, 32, 3), out_features=["stage1", "stage2"])
    backbone = keras_hub.models.DFineBackbone(
        backbone=encoder, decoder_in_channels=[8, 8], encoder_hidden_dim=8,
        num_denoising=0, num_labels=3, hidden_dim=8, learn_initial_query=False,
        num_queries=6, anchor_image_size=(32, 32), feat_strides=[4, 8],
        num_feature_levels=2, encoder_in_channels=[8, 8], encode_proj_layers=[1],
        num_attention_heads=2, encoder_ffn_dim=8, num_encoder_layers=1,
        hidden_expansion=0.5, depth_multiplier=0.5, eval_idx=-1,
        num_decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=8,
        decoder_n_points=[2, 2], lqe_hidden_dim=4, num_lqe_layers=2,
        out_features=["stage1", "stage2"], image_shape=(32, 32, 3))
    model = cls(backbone=backbone, num_classes=3, bounding_box_format="yxyx")
    _freeze_batch_norms(model)
    images = _rng().uniform(size=(4, 32, 32, 3)).astype("float32")
    return (model, images, _boxes(4, 32, normalized=True),
            "DFineBackbone on a 2-stage HGNetV2, 6 queries, 1 decoder layer, 32x32 images; 3 classes")


def d_fine_object_detector():
    return _d_fine(keras_hub.models.DFineObjectDetector)


def d_fine_fixed():
    from keras_batchfix.integrations.d_fine import DFineObjectDetector

    return _d_fine(DFineObjectDetector)


# name -> (builder, keras-hub class whose loss code it runs, the loss in words, the fix)
TASKS = {
    "GPT2CausalLM": (gpt2_causal_lm, "GPT2CausalLM",
                     "SparseCategoricalCrossentropy(from_logits), padding mask as sample_weight",
                     "`integrations.causal_lm`: `token_loss()` + `micro_batches` (the padding mask weighs a token 1/(B*T); tests/integrations/test_causal_lm.py)"),
    "GemmaCausalLM": (gemma_causal_lm, "GemmaCausalLM",
                      "SparseCategoricalCrossentropy(from_logits), padding mask as sample_weight",
                      "as GPT2CausalLM: `NormalizerUpdates` mixin + `token_loss()`"),
    "BartSeq2SeqLM": (bart_seq2seq_lm, "BartSeq2SeqLM",
                      "SparseCategoricalCrossentropy(from_logits), padding mask as sample_weight",
                      "as GPT2CausalLM: `NormalizerUpdates` mixin + `token_loss()`"),
    "BertTextClassifier": (bert_text_classifier, "BertTextClassifier",
                           "SparseCategoricalCrossentropy(from_logits)", "none needed"),
    "BertMaskedLM": (bert_masked_lm, "BertMaskedLM",
                     "SparseCategoricalCrossentropy(from_logits), mask weights as sample_weight",
                     "as GPT2CausalLM: `NormalizerUpdates` mixin + `token_loss()`"),
    "ResNetImageClassifier": (resnet_image_classifier, "ResNetImageClassifier",
                              "SparseCategoricalCrossentropy(from_logits)", "none needed"),
    "DeepLabV3ImageSegmenter": (deeplab_v3_image_segmenter, "DeepLabV3ImageSegmenter",
                                "CategoricalCrossentropy(from_logits), one-hot masks", "none needed"),
    "DepthAnythingDepthEstimator": (depth_anything_depth_estimator, "DepthAnythingDepthEstimator",
                                    "DepthAnythingLoss", "none needed"),
    "RetinaNetObjectDetector": (retinanet_object_detector, "RetinaNetObjectDetector",
                                "own compute_loss: focal + Huber sums / this replica's positive anchors",
                                "`integrations.retinanet.RetinaNetObjectDetector`"),
    "keras_batchfix RetinaNetObjectDetector": (
        retinanet_fixed, None, "the same sums / GlobalCount of positive anchors",
        "micro_batches: not applicable (own compute_loss); train without accumulation"),
    "DFineObjectDetector": (d_fine_object_detector, "DFineObjectDetector",
                            "own compute_loss: VFL, L1, CIoU, FGL sums / this replica's label slots (padding included)",
                            "`integrations.d_fine.DFineObjectDetector`"),
    "keras_batchfix DFineObjectDetector": (
        d_fine_fixed, None, "the same sums, image by image / GlobalCount of real objects",
        "micro_batches: not applicable (own compute_loss); train without accumulation"),
}
QUICK = ("BertTextClassifier", "GPT2CausalLM")


def loss_groups():
    """{loss-defining methods: [task class names]} over keras-hub's task classes."""
    groups = {}
    for name in sorted(dir(keras_hub.models)):
        cls = getattr(keras_hub.models, name)
        if not (isinstance(cls, type) and issubclass(cls, keras_hub.models.Task)):
            continue
        if cls is keras_hub.models.Task:
            continue
        key = []
        for method in ("compute_loss", "compile", "train_step"):
            for klass in cls.__mro__:
                if klass is keras_hub.models.Task:
                    break
                if method in vars(klass):
                    key.append(f"{klass.__name__}.{method}")
                    break
        groups.setdefault(tuple(key), []).append(name)
    return groups


def group_of(class_name, groups):
    for key, members in groups.items():
        if class_name in members:
            return key
    return None


def fmt(value, digits=3):
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


def audit(names, verbose=True):
    rows = []
    for name in names:
        builder, hub_class, loss, fix = TASKS[name]
        start = time.time()
        row = {"task": name, "loss": loss, "fix": fix}
        try:
            keras.utils.set_random_seed(RNG_SEED)
            model, x, y, config = builder()
            model.compile(optimizer=keras.optimizers.SGD(1e-3))
            result = keras_batchfix.diagnose_model(model, x, y, repeats=(1, 2))
        except Exception as error:  # a task that cannot be built small
            row.update(config="", verdict=f"not built: {type(error).__name__}: "
                       f"{str(error).splitlines()[0][:160]}")
            rows.append(row)
            print(f"{name}: {row['verdict']}", flush=True)
            continue
        row.update(
            config=config, verdict=result.verdict,
            exponent=result.exponent, replica_equal=result.replica_factor,
            replica_split=result.replica_factor_split,
            unequal=result.unequal_split_factor,
            accumulation=result.accumulation_factor,
            probe=result.probes.get("replicas", ""),
        )
        rows.append(row)
        if verbose:
            print(f"{name} ({time.time() - start:.0f} s): {result.verdict}, "
                  f"exponent {fmt(row['exponent'])}, replicas x{fmt(row['replica_equal'])} / "
                  f"x{fmt(row['replica_split'])}, unequal x{fmt(row['unequal'])}, "
                  f"accumulation x{fmt(row['accumulation'])}", flush=True)
    return rows


def table(rows, groups):
    lines = [
        "| task | classes that run the same loss code | backbone config | loss | batch exponent | "
        "replica factor (equal / distinct samples) | unequal split | accumulation (2) | verdict | fix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        hub_class = TASKS[row["task"]][1]
        members = groups.get(group_of(hub_class, groups), []) if hub_class else []
        others = [m for m in members if m != hub_class]
        same = ", ".join(others) if others else "-"
        lines.append(
            f"| {row['task']} | {same} | {row['config']} | {row['loss']} | "
            f"{fmt(row.get('exponent'), 2)} | x{fmt(row.get('replica_equal'))} / "
            f"x{fmt(row.get('replica_split'))} | x{fmt(row.get('unequal'))} | "
            f"x{fmt(row.get('accumulation'))} | {row['verdict']} | {row['fix']} |"
        )
    return "\n".join(lines)


def unbuilt(groups, rows):
    covered = set()
    for row in rows:
        hub_class = TASKS[row["task"]][1]
        if hub_class and not row["verdict"].startswith("not built"):
            covered.update(groups.get(group_of(hub_class, groups), []))
    return {key: members for key, members in groups.items()
            if not covered.intersection(members)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--tasks", help="comma-separated task names: " + ", ".join(TASKS))
    parser.add_argument("--out", default=os.path.join(ROOT, "reproductions", "results",
                                                      "keras_hub_audit"))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/keras_hub.md")
    args = parser.parse_args(argv)
    names = list(QUICK) if args.quick else list(TASKS)
    if args.tasks:
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            parser.error(f"--tasks: unknown {unknown}; known: {list(TASKS)}")
    start = time.time()
    groups = loss_groups()
    rows = audit(names)
    text = table(rows, groups)
    rest = unbuilt(groups, rows)
    rest_text = "\n".join(
        f"- {', '.join(members)}: loss from {', '.join(key) or 'keras.Model'}"
        for key, members in sorted(rest.items(), key=lambda kv: kv[1])
    )
    elapsed = time.time() - start
    command = "python reproductions/keras_hub_audit.py" + (" --quick" if args.quick else "")
    footer = (
        f"Made by `{command}` in {elapsed:.0f} s on {platform.machine()} "
        f"({os.cpu_count()} CPUs, no GPU), keras-hub {keras_hub.__version__}, "
        f"Keras {keras.__version__}, backend {keras.backend.backend()}."
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n\n" + footer + "\n\nGroups not built:\n\n" + rest_text + "\n")
    with open(os.path.join(args.out, "audit.csv"), "w", newline="") as f:
        fields = ["task", "config", "loss", "exponent", "replica_equal", "replica_split",
                  "unequal", "accumulation", "probe", "verdict", "fix"]
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(text)
    print(footer)
    if not args.quick and not args.no_docs and os.path.exists(DOCS):
        docs = open(DOCS).read()
        block = f"{BEGIN}\n{text}\n\n{footer}\n\nTask classes whose loss code no built task runs (no small builder in the audit yet):\n\n{rest_text}\n{END}"
        docs = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, docs,
                      flags=re.S)
        with open(DOCS, "w") as f:
            f.write(docs)
    return rows


if __name__ == "__main__":
    main()
