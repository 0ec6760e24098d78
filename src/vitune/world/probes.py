"""Gauges of the world's backbones. The CLIP: caption retrieval, hard-negative choice, and linear
probes on the patch features LLaVA will use (vision tower, penultimate layer, patch tokens). The
LM: whether it answers questions about a scene from the scene's text (in-context reading).

A probe reads one object from the frozen features: the patch tokens are averaged over the
object's box (each patch weighted by how much of it the box covers) and a logistic regression,
fitted on the objects of some held-out scenes and scored on others, predicts the object's shape,
colour and 3x3 position. A probe on a randomly initialised tower of the same shape is the
baseline: what the architecture gives for free.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch

from vitune.world.questions import POSITIONS, SHORT_ANSWER_SUFFIX, accuracy_by_type, short_answer_questions
from vitune.world.scene import COLORS, SHAPES, Scene, position_phrase

PROBE_TARGETS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "position": POSITIONS}


def box_weights(bbox: Sequence[float], grid: int) -> torch.Tensor:
    """[grid*grid] weights: the share of each patch (row-major) that the box covers, summing to 1."""
    return boxes_weights([bbox], grid)[0]


def boxes_weights(bboxes: Sequence[Sequence[float]], grid: int) -> torch.Tensor:
    """`box_weights` of many boxes at once: [N, grid*grid] (one call for a world's ~18k objects)."""
    boxes = torch.as_tensor(bboxes, dtype=torch.float32).reshape(-1, 4)
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    lo, hi = edges[:-1], edges[1:]
    wx = (torch.minimum(hi, boxes[:, 2:3]) - torch.maximum(lo, boxes[:, 0:1])).clamp(min=0)
    wy = (torch.minimum(hi, boxes[:, 3:4]) - torch.maximum(lo, boxes[:, 1:2])).clamp(min=0)
    w = (wy[:, :, None] * wx[:, None, :]).flatten(1)
    return w / w.sum(1, keepdim=True).clamp(min=1e-8)


def object_labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Per object (scene order, then instance order): index of its shape, colour and position."""
    insts = [i for s in scenes for i in s.instances]
    return {
        "shape": torch.tensor([SHAPES.index(i.category) for i in insts]),
        "color": torch.tensor([COLORS.index(i.color) for i in insts]),
        "position": torch.tensor([POSITIONS.index(position_phrase(i)) for i in insts]),
    }


def pooled_object_features(patch_features: torch.Tensor, scenes: Sequence[Scene]) -> torch.Tensor:
    """[objects, D] from [scenes, grid*grid, D] patch features, averaged over each object's box."""
    grid = int(round(patch_features.shape[1] ** 0.5))
    weights = boxes_weights([inst.bbox for scene in scenes for inst in scene.instances], grid)
    owner = torch.tensor([k for k, scene in enumerate(scenes) for _ in scene.instances])
    return torch.einsum("op,opd->od", weights, patch_features[owner])


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression (standardised inputs folded into the layer), full-batch LBFGS."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    layer = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=0.5, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(z), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation in, so the probe reads raw features
        layer.weight.div_(std)
        layer.bias.sub_(layer.weight @ mean)
    return layer


def probe_accuracies(
    train_features: torch.Tensor, train_scenes: Sequence[Scene], test_features: torch.Tensor, test_scenes: Sequence[Scene]
) -> dict[str, dict[str, float]]:
    """Accuracy and chance (majority class of the probe's training objects) per target."""
    xtr, xte = pooled_object_features(train_features, train_scenes), pooled_object_features(test_features, test_scenes)
    ytr, yte = object_labels(train_scenes), object_labels(test_scenes)
    out = {}
    with torch.enable_grad():
        for target, classes in PROBE_TARGETS.items():
            probe = fit_probe(xtr, ytr[target], len(classes))
            with torch.no_grad():
                acc = (probe(xte).argmax(-1) == yte[target]).float().mean().item()
            majority = torch.bincount(ytr[target], minlength=len(classes)).argmax()
            chance = (yte[target] == majority).float().mean().item()
            out[target] = {"accuracy": round(acc, 4), "chance": round(chance, 4)}
    return out


def retrieval_top1(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Image-to-text top-1: the share of images whose own caption (same row) scores highest."""
    sims = image_embeds @ text_embeds.T
    return (sims.argmax(-1) == torch.arange(len(sims))).float().mean().item()


def text_qa(lm, tokenizer, scenes: Sequence[Scene], seed: int = 0) -> dict:
    """The LM alone answering the short-answer questions of `scenes` from their text: each question
    follows the scene's detailed description (which names every object, its colour and place) in
    the corpus's chat layout, and the answer is the choice of its type's answer set that the LM
    finds most likely. This is the in-context reading that LLaVA's stage 2 turns onto image tokens;
    Vicuna brings it from pretraining, and an LM without it has to learn it in stage 2.
    Returns {"accuracy", "chance", "by_type": {TYPE: {"accuracy", "chance", "n"}}}."""
    from vitune.world.corpus import chat, detailed_description, world_system

    system = world_system()
    rng = random.Random(seed)
    hits: dict[str, list[bool]] = defaultdict(list)
    for scene in scenes:  # one forward per scene: every choice of every question
        context = detailed_description(scene, rng)
        questions = short_answer_questions(scene, rng)
        if not questions:
            continue
        texts = [chat(system, context, [(f"{q.question} {SHORT_ANSWER_SUFFIX}", c)]) for q in questions for c in q.choices]
        scores = _continuation_logprobs(lm, tokenizer, texts).split([len(q.choices) for q in questions])
        for q, s in zip(questions, scores):
            hits[q.type].append(q.choices[int(s.argmax())] == q.answer)
    summary = accuracy_by_type(dict(sorted(hits.items())))
    return {
        "accuracy": round(summary["accuracy"], 4),
        "chance": round(summary["chance"], 4),
        "by_type": {t: {**v, "accuracy": round(v["accuracy"], 4), "chance": round(v["chance"], 4)} for t, v in summary["by_type"].items()},
    }


def _continuation_logprobs(lm, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """[len(texts)] summed log-probabilities of each text's tokens after the shared context (the
    texts' common prefix, here the description), so choices of one question compare fairly: their
    common question tokens add the same amount to each."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    start = 0
    while all(len(x) > start + 1 for x in ids) and len({x[start] for x in ids}) == 1:
        start += 1
    width = max(len(x) for x in ids)
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for k, x in enumerate(ids):
        batch[k, : len(x)], mask[k, : len(x)] = torch.tensor(x), 1
    with torch.no_grad():
        logprobs = lm(input_ids=batch, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    token_lp = logprobs.gather(-1, batch[:, 1:, None])[..., 0] * mask[:, 1:]
    return token_lp[:, max(0, start - 1) :].sum(-1)
