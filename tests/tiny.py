"""The tiny models of the tests and the demo: random-weight Qwen2-VL / Qwen2.5-VL, no download.

    python tests/tiny.py OUT [--qwen25]   # writes OUT/ : config, weights, tokenizer, processor

writes what a user would bring: a model folder that transformers' from_pretrained loads, as grpo_vl.py
loads any folder. The tokenizer is a byte-level BPE trained on the spot on the prompts and the synthetic
task (shapes.py); the model is the real class at ~0.2M parameters.
"""

import os
import shutil
import sys

import torch
import transformers as tf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
import shapes  # noqa: E402


# ============================================================================ engineering: models
TINY_TEMPLATE = (  # Qwen2-VL's chat template, minus the default system turn
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL += ["<|vision_start|>", "<|vision_end|>"]  # Qwen2-VL's special tokens


def build(seed=0, hidden=64, layers=2, qwen25=False, tower=None, tied=False):
    """A random-weight Qwen2-VL or Qwen2.5-VL (~0.2M parameters) with a byte-level BPE tokenizer trained on
    the spot on the prompts and the synthetic task: real processor, real model class, no download. tied:
    lm_head is embed_tokens (tie_word_embeddings), as in the real Qwen2-VL-2B."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = shapes.synthetic_rows(200, 12345)
    corpus = [data.P1 + data.P2 + data.P3] + [r["prompt"] for r in rows] + [r["solution"] for r in rows]
    corpus += ["<think> I see the image. Wait, let me check. </think> <answer> (A) </answer> 0123456789"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    ids = tok.convert_tokens_to_ids
    special = dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"], ids("<|endoftext|>"))
    # head_dim hd; M-RoPE splits its hd/2 rotary frequencies over (t, h, w) 2:3:3 (2B: 16, 24, 24)
    hd = hidden // 4
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16]}
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2)  # patch 14, merge 2
    if qwen25:  # the 2.5 tower names its sizes differently and adds windowed attention
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden)
        vision.update(window_size=56, fullatt_block_indexes=[1])
    cfg = (tf.Qwen2_5_VLConfig if qwen25 else tf.Qwen2VLConfig)(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_hidden_layers=layers,
            num_key_value_heads=2,
            rope_parameters=rope,
            **special,
        ),
        vision_config={**vision, **(tower or {})},  # tower: overrides (the bench's vision-heavy model)
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tied,
        **special,
    )
    torch.manual_seed(seed)
    model = (tf.Qwen2_5_VLForConditionalGeneration if qwen25 else tf.Qwen2VLForConditionalGeneration)(cfg)
    processor = (tf.Qwen2_5_VLProcessor if qwen25 else tf.Qwen2VLProcessor)(
        image_processor=tf.Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=tf.Qwen2VLVideoProcessor(),
        chat_template=TINY_TEMPLATE,
    )
    return model, processor


def write(folder, seed=0, **kwargs):
    """build(seed, **kwargs) saved as a model folder, once: a folder with a config is left as it is."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        model, processor = build(seed, **kwargs)
        tmp = f"{folder}.{os.getpid()}.tmp"
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same folder meanwhile
            shutil.rmtree(tmp)
    return folder


CACHE = os.path.join(HERE, ".fixtures")  # built once, reused by every test and run (git ignores it)


def model_dir(kind="tiny", seed=0):
    """The cached folder of the tiny model ('tiny'), its Qwen2.5-VL twin ('tiny-2.5') or its twin whose
    lm_head is tied to embed_tokens ('tiny-tied')."""
    folder = os.path.join(CACHE, f"{kind}-{seed}")
    return write(folder, seed, qwen25=kind == "tiny-2.5", tied=kind == "tiny-tied")


def data_file(n=64, seed=0, tasks=shapes.TASKS):
    """The cached synthetic data set of n rows (shapes.py): the path of its rows.jsonl."""
    return shapes.write(os.path.join(CACHE, f"shapes-{n}-{seed}-{'-'.join(tasks)}"), n, seed, tasks)


def flags():
    """What `--model tiny` used to mean: the tiny model, the synthetic data (2,000 training rows, 64 held-out
    ones drawn with the next seed), and the settings of a laptop run. Later flags override these."""
    return [
        "--model",
        model_dir(),
        "--data",
        data_file(2000),
        "--eval-data",
        data_file(64, seed=1),
        "--max-new-tokens",
        "96",
        "--eval-max-new-tokens",
        "96",
        "--prompts-per-step",
        "4",
        "--sft-lr",
        "1e-2",
        "--no-gradient-checkpointing",
    ]


if __name__ == "__main__":
    tf.utils.logging.disable_progress_bar()
    print(write(sys.argv[1], qwen25="--qwen25" in sys.argv))
