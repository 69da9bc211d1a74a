"""The memory arithmetic of tests/README.md ("What the real runs need"), in one place: test_memory.py checks
the README's table against it, tests/gpu.py prints it beside what a real-sized run measures."""

import transformers as tf

import grpo_vl as g

# ---------------------------------------------------------------------- the real architectures
# Qwen/Qwen2-VL-2B's config.json, the numbers that size the model (tests/gpu.py builds it at any depth)
QWEN2_VL_2B_TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)  # patch 14


def qwen2_vl_2b(layers=28, depth=32, text=None, vision=None, **top):
    """Qwen2-VL-2B's config with `layers` decoder layers and `depth` vision blocks; text, vision: entries of
    text_config and vision_config to change (token ids, widths), top: more top-level ones."""
    text_config = {**QWEN2_VL_2B_TEXT, "num_hidden_layers": layers, **(text or {})}
    vision_config = {**QWEN2_VL_2B_VISION, "depth": depth, **(vision or {})}
    return tf.Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=True, **top
    )


QWEN2_VL_2B = qwen2_vl_2b()  # the hub config's numbers (Qwen/Qwen2-VL-2B)
QWEN25_VL_7B = tf.Qwen2_5_VLConfig(  # Qwen/Qwen2.5-VL-7B-Instruct
    text_config=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    tie_word_embeddings=False,
)


def dims(config, params):
    """What the arithmetic needs of a Qwen2-VL config (MODELS' entries): its parameter count `params`,
    width, layers, K/V width per layer, vocabulary, tied lm_head, and the vision tower's width and depth."""
    t, v = config.text_config, config.vision_config
    kv_width = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    return dict(
        params=params,
        hidden=t.hidden_size,
        layers=t.num_hidden_layers,
        kv_width=kv_width,
        vocab=t.vocab_size,
        tied=config.tie_word_embeddings,
        vit_width=v.embed_dim,
        vit_layers=v.depth,
    )


MODELS = {  # parameters (test_memory.py checks them), the sizes above; both towers: width 1280, 32 layers
    "Qwen2-VL-2B": dict(
        params=2_208_985_600, hidden=1536, layers=28, kv_width=2 * 128, vocab=151_936, tied=True
    ),
    "Qwen2.5-VL-7B": dict(
        params=8_292_166_656, hidden=3584, layers=28, kv_width=4 * 128, vocab=152_064, tied=False
    ),
}
VIT_WIDTH, VIT_LAYERS = 1280, 32  # both vision towers
for m in MODELS.values():
    m.update(vit_width=VIT_WIDTH, vit_layers=VIT_LAYERS)
IMAGE_TOKENS, PATCHES = 512, 2048  # max_pixels ~401,408: 2,048 patches of 14 x 14, 512 tokens after 2x2 merge
TEXT_TOKENS = 150  # the prompt's text: template, instructions, question


# ---------------------------------------------------------------------- the arithmetic
def terms(
    m,
    seq,
    patches,
    sequences,
    micro_batch,
    checkpointing=True,
    gpus=4,
    images=None,
    scored=None,
    foreach=True,
):
    """tests/README.md's terms, in bytes per GPU under FSDP2 over `gpus` ranks, bf16 compute. m: a MODELS
    entry (or dims()); seq: tokens per sequence (prompt + new tokens); patches: per image; sequences: what a
    rank holds at once (G in a rollout, examples per rank in SFT). The README's table takes the defaults;
    tests/gpu.py measured what the last three change ("./run.sh gpu" in tests/README.md): images through the
    tower per micro-batch (default one per sequence; RL's vision sharing: 1), completion tokens scored per
    micro-batch (default a whole logits chunk), and AdamW's multi-tensor step (CUDA's) or its loop (CPU's)."""
    P = m["params"]
    states = 16 * P / gpus  # fp32 weights + fp32 gradients + AdamW's two fp32 moments, sharded
    reference = 4 * P / gpus  # fp32, sharded, gathered one layer at a time
    # loaded: the fp32 weights of policy and reference (no gradients, no moments yet); under torchrun rank 0
    # broadcasts each whole tensor, which every rank receives before keeping its shard: the largest, the
    # vocabulary x width embedding, at most in fp32
    load = 8 * P / gpus + (m["vocab"] * m["hidden"] * 4 if gpus > 1 else 0)
    # rollout: the whole policy gathered in bf16 plus the bf16 K and V of every layer for every token
    rollout = 2 * P + sequences * seq * 2 * m["layers"] * m["kv_width"] * 2
    # update: ~34 x width bytes of bf16 activations per token per layer; with checkpointing a layer keeps its
    # 2 x width input and one layer at a time holds the full 34 x width while it is recomputed
    n = min(micro_batch, sequences)
    images = n if images is None else images
    per_token = 2 * m["layers"] + 34 if checkpointing else 34 * m["layers"]
    per_patch = 2 * m["vit_layers"] + 34 if checkpointing else 34 * m["vit_layers"]
    update = n * seq * m["hidden"] * per_token + images * patches * m["vit_width"] * per_patch
    chunk = min(g.LOGPROB_CHUNK, scored or g.LOGPROB_CHUNK)  # completion tokens projected at once
    logits = 3 * chunk * m["vocab"] * 4  # a chunk's fp32 logits, their exp and gradient
    update += logits
    update += (1 if m["tied"] else 2) * m["vocab"] * m["hidden"] * 4  # root: gathered bf16 embeddings + grads
    # the reference's forward (no gradient): a chunk's logits and one layer's activations at a time
    score = logits + n * seq * m["hidden"] * 34 + images * patches * m["vit_width"] * 34
    # AdamW's step: the multi-tensor one makes sqrt(v) of every parameter of the rank at once (fp32); the loop
    # sqrt(v) and its quotient of one parameter, at most the vocabulary x width embedding (its shard)
    optimizer = 4 * P / gpus if foreach else 2 * m["vocab"] * m["hidden"] * 4 / gpus
    out = dict(states=states, reference=reference, rollout=rollout, update=update)
    return dict(out, load=load, score=score, optimizer=optimizer)


def per_gpu_gb(model, sequences, new_tokens, micro_batch, generates=True, checkpointing=True, gpus=4):
    """Per-GPU peak of a README table row: states + reference + the largest of rollout, update and optimizer
    step, in GB. new_tokens: the completion or SFT target cap. An RL micro-batch sends its prompt's image
    through the tower once (shared_vision); an SFT one, each example's."""
    seq = IMAGE_TOKENS + TEXT_TOKENS + new_tokens
    images = 1 if generates else None
    t = terms(MODELS[model], seq, PATCHES, sequences, micro_batch, checkpointing, gpus, images)
    peak = max(t["rollout"] if generates else 0, t["update"], t["optimizer"])
    return (t["states"] + t["reference"] + peak) / 1e9
