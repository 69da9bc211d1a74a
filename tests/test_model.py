"""The tiny Qwen2-VL: scoring log-probs equal sampling log-probs (G8), batching of images (I3), banned
vision tokens (I5), loading from a saved folder."""

from types import SimpleNamespace

import torch
from conftest import tiny_run

import data
import grpo_vl as g
import tiny as fixtures


def tiny_args(*flags):
    return g.parse_args([*fixtures.flags(), *flags])


def encode(processor, exs, args):
    """The prompts of `exs`, left-padded in one batch, as grpo_vl.py encodes them for the variant."""
    return data.encode(processor, exs, g.PROMPT[args.variant], args.max_pixels)


def rollout_batch(tiny, exs, G, T=0.7, max_new=12, seed=0, variant="r1zero"):
    """G completions of each prompt of `exs`, sampled as rollout() samples: G copies of the prompt batch,
    so sequence i answers prompt i % len(exs), the layout token_logprobs scores."""
    model, processor, eos, banned = tiny
    args = tiny_args("--variant", variant, "--temperature", str(T), "--max-new-tokens", str(max_new))
    prompt = encode(processor, exs, args)
    torch.manual_seed(seed)
    out = model.generate(  # as rollout() calls it: the plain-sampling settings are the model's (load_models)
        **g.copies(prompt, G, torch.device("cpu")),
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        output_scores=True,
        return_dict_in_generate=True,
    )
    b = {"prompt": prompt, "completion": out.sequences[:, prompt["input_ids"].shape[1] :]}
    b["mask"], b["truncated"] = g.completion_mask(b["completion"], eos)
    return b, torch.stack(out.scores, 1), args


def test_images_differ_in_size_and_prompts_are_left_padded(tiny, examples):
    _, processor, _, _ = tiny
    exs = [examples[1], examples[2], examples[3]]
    b = encode(processor, exs, tiny_args())
    assert len({tuple(t) for t in b["image_grid_thw"].tolist()}) > 1, "the test needs different image sizes"
    assert (b["attention_mask"][:, -1] == 1).all() and (b["attention_mask"][:, 0] == 0).any()  # left padding
    # I4: per sample, image tokens = grid.prod() / merge^2
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (b["input_ids"] == image_id).sum(1).tolist() == (b["image_grid_thw"].prod(-1) // 4).tolist()


def test_g8_scoring_logprobs_equal_sampling_distribution(tiny, examples):
    """Left-padded batch of prompts with different image sizes, temperature 0.7: the scoring forward
    gives exactly the log-probs of the distribution each token was sampled from."""
    model, _, _, banned = tiny
    b, scores, args = rollout_batch(tiny, [examples[1], examples[2], examples[3]], G=2)
    sampled = scores.log_softmax(-1).gather(-1, b["completion"][..., None]).squeeze(-1)  # (N, C)
    with torch.no_grad():
        scored = g.token_logprobs(model, b, args.temperature, banned, torch.device("cpu"))
    m = b["mask"].bool()
    assert m.sum() > 20
    assert torch.allclose(scored[m], sampled[m], atol=2e-4), (scored[m] - sampled[m]).abs().max()
    # and at a different temperature they would not match: the test can fail
    with torch.no_grad():
        wrong = g.token_logprobs(model, b, 1.0, banned, torch.device("cpu"))
    assert (wrong[m] - sampled[m]).abs().max() > 1e-2


def test_rollout_samples_at_the_flag_temperature(tiny, examples):
    """rollout() hands --temperature to generate(): at T = 1e-4 its samples are the greedy completions; at
    T = 1 the same seed samples others (a random model's distribution is nearly flat)."""
    model, processor, eos, banned = tiny
    run = SimpleNamespace(processor=processor, eos=eos, device=torch.device("cpu"))
    args = tiny_args("--temperature", "1e-4", "--max-new-tokens", "12", "--num-generations", "4")
    prompt = g.copies(encode(processor, [examples[1]], args), 4, torch.device("cpu"))
    greedy = model.generate(**prompt, do_sample=False, max_new_tokens=12)[:, prompt["input_ids"].shape[1] :]
    (cold,) = g.rollout(model, [examples[1]], args, run, seed=5)
    assert torch.equal(cold["completion"], greedy)
    (hot,) = g.rollout(model, [examples[1]], g.replace(args, temperature=1.0), run, seed=5)
    assert not torch.equal(hot["completion"], greedy)


def test_i5_vision_tokens_are_never_sampled(tiny, examples):
    _, processor, _, banned = tiny
    b, _, _ = rollout_batch(tiny, [examples[0], examples[1]], G=8, T=3.0, max_new=40, seed=1)
    assert not torch.isin(b["completion"], torch.tensor(banned)).any()


def test_i3_copies_keep_each_sequence_with_its_own_image_rows(tiny, examples):
    """Copies of a batch of 3 prompts (different image sizes) give sequence i exactly the prompt tokens and
    image rows (in the order the model reads them) of prompt i % 3 encoded on its own; and scoring the
    batch equals scoring each sequence alone (padding and image rows handled)."""
    model, processor, _, banned = tiny
    args = tiny_args()
    exs = [examples[1], examples[2], examples[3]]
    alone = [encode(processor, [ex], args) for ex in exs]
    assert len({a["pixel_values"].shape for a in alone}) > 1, "the test needs different image sizes"
    two = g.copies(encode(processor, exs, args), 2, torch.device("cpu"))  # (6, L)
    pixels = two["pixel_values"].split(two["image_grid_thw"].prod(-1).tolist())  # one block per image
    assert len(pixels) == 6  # one image per sequence
    for i in range(6):
        own = alone[i % 3]
        assert two["input_ids"][i][two["attention_mask"][i].bool()].tolist() == own["input_ids"][0].tolist()
        assert torch.equal(pixels[i], own["pixel_values"]), i
        assert torch.equal(two["image_grid_thw"][i : i + 1], own["image_grid_thw"]), i
    b, _, _ = rollout_batch(tiny, exs, G=2)
    with torch.no_grad():
        together = g.token_logprobs(model, b, 0.7, banned, torch.device("cpu"))
        for row in (1, 4):
            one = {"prompt": alone[row % 3], "completion": b["completion"][row : row + 1]}
            one["mask"] = b["mask"][row : row + 1]
            m = one["mask"][0].bool()
            assert m.sum() > 0
            assert torch.allclose(
                g.token_logprobs(model, one, 0.7, banned, torch.device("cpu"))[0][m],
                together[row][b["mask"][row].bool()],
                atol=2e-4,
            )


def test_i3_copies_of_a_prompt_of_two_images_keep_both_in_order(tiny, examples):
    """A prompt of two images (the instruct prompt P2 has one slot per image) of different sizes: each of its
    G copies holds both images' rows, first image first, and its grid rows in that order; the G completions
    sampled from the copies are scored exactly as sampled (G8), and scoring one copy alone gives the same."""
    model, processor, _, banned = tiny
    args = tiny_args("--variant", "grpo")
    ex = {**examples[1], "images": examples[1]["images"] + examples[2]["images"]}  # grids 6 x 8, then 8 x 8
    prompt = encode(processor, [ex], args)
    firsts = [encode(processor, [e], args)["pixel_values"] for e in (examples[1], examples[2])]
    assert prompt["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 8]]
    assert torch.equal(prompt["pixel_values"], torch.cat(firsts))  # the prompt's rows: image 1, image 2
    G = 3
    three = g.copies(prompt, G, torch.device("cpu"))
    pixels = three["pixel_values"].split(three["image_grid_thw"].prod(-1).tolist())  # one block per image
    assert len(pixels) == 2 * G and three["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 8]] * G
    for i in range(G):
        assert torch.equal(three["input_ids"][i], prompt["input_ids"][0])
        assert torch.equal(pixels[2 * i], firsts[0]) and torch.equal(pixels[2 * i + 1], firsts[1]), i
    b, scores, args = rollout_batch(tiny, [ex], G=G, max_new=16, variant="grpo")
    sampled = scores.log_softmax(-1).gather(-1, b["completion"][..., None]).squeeze(-1)  # (G, C)
    with torch.no_grad():
        scored = g.token_logprobs(model, b, args.temperature, banned, torch.device("cpu"))
        one = {"prompt": prompt, "completion": b["completion"][2:], "mask": b["mask"][2:]}
        alone = g.token_logprobs(model, one, args.temperature, banned, torch.device("cpu"))
    m = b["mask"].bool()
    assert m.sum() > 10 and len({tuple(c.tolist()) for c in b["completion"]}) == G  # G different samples
    assert torch.allclose(scored[m], sampled[m], atol=2e-4), (scored[m] - sampled[m]).abs().max()
    assert torch.allclose(alone[0][m[2]], scored[2][m[2]], atol=2e-4)


def test_from_pretrained_on_a_saved_folder(tiny, examples, tmp_path):
    """The real loading path (auto classes) on a folder written with save_pretrained."""
    model, processor, _, _ = tiny
    from transformers import GenerationConfig

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # what Qwen2-VL-Instruct ships (near-greedy sampling), plus a setting our generate() call does not name
    GenerationConfig(
        do_sample=True,
        top_k=1,
        top_p=0.001,
        temperature=0.01,
        repetition_penalty=1.05,
        min_p=0.9,
        eos_token_id=0,
        pad_token_id=0,
    ).save_pretrained(tmp_path)
    run = tiny_run("--model", str(tmp_path))
    loaded, proc2, eos, banned = run.model, run.processor, run.eos, run.banned
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert proc2.tokenizer.convert_tokens_to_ids("<|image_pad|>") in banned
    # the hub's sampling settings are gone: rollouts still sample exactly what the scoring forward scores
    b, scores, args = rollout_batch((loaded.eval(), proc2, eos, banned), [examples[0]], G=4, T=1.0)
    with torch.no_grad():
        scored = g.token_logprobs(loaded, b, 1.0, banned, torch.device("cpu"))
    sampled = scores.log_softmax(-1).gather(-1, b["completion"][..., None]).squeeze(-1)
    m = b["mask"].bool()
    assert torch.allclose(scored[m], sampled[m], atol=2e-4)
    assert len({tuple(c.tolist()) for c in b["completion"]}) == 4  # sampled, not greedy


def test_tiny_is_deterministic_for_a_seed():
    """tests/tiny.py's model (its folder is built once and reused by every test and run) is a function of
    its seed."""
    a, _ = fixtures.build(seed=3)
    b, _ = fixtures.build(seed=3)
    c, _ = fixtures.build(seed=4)
    p = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[p], b.state_dict()[p]) and not torch.equal(
        a.state_dict()[p], c.state_dict()[p]
    )
