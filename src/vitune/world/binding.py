"""Where a trained model looks when it answers about one object among several (`vitune world binding`).

"What color is the circle?" about a scene with two to four objects needs two look-ups: a
first-layer head from the answer position to the question's object words, then a head of the last
layer from there to the image token that holds the named object. A model that has not learned
the first answers from the whole image (right about one-object scenes, near chance about several);
this gauge tells the cases apart from the attention maps alone. For each colour and shape question
about a scene with two or more objects, at the position that predicts the answer's first token
(the largest head's share of attention, averaged over questions):
- `first_layer_on_object_words`: on the question's colour, shape and size words;
- `last_layer_on_named_object`: on the image token under the named object's centre;
- `last_layer_on_best_other`: the most-attended image token under another object's centre.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vitune.errors import VituneError
from vitune.world.questions import referring_phrase
from vitune.world.scene import COLORS, SHAPES, SIZES, Instance

GAUGED_TYPES: tuple[str, ...] = ("color", "shape")


def _token_of(inst: Instance, grid: int) -> int:
    x, y = inst.center
    return min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)


def binding_attention(model_dir: str | Path, world: str | Path, split: str = "test", scenes: int = 150, seed: int = 0) -> dict[str, Any]:
    """The gauge above for the model at `model_dir` on the first `scenes` scenes of `world`'s
    `split`, with the questions toy-vqa asks (`seed` as its seed)."""
    from PIL import Image

    from vitune.eval.toy import vqa_questions
    from vitune.inference import Pipeline

    world = Path(world)
    pipe = Pipeline.from_pretrained(model_dir)
    model, processor = pipe.model, pipe.processor
    model.language_model.set_attn_implementation("eager")  # SDPA does not return attention maps
    n_tokens = int(model.config.num_image_tokens)
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise VituneError(f"{model_dir}: {n_tokens} image tokens are not a square grid; the gauge maps objects to grid cells")
    words = set(COLORS) | set(SHAPES) | set(SIZES)
    sums = {t: [0.0, 0.0, 0.0, 0] for t in GAUGED_TYPES}
    for scene, questions in vqa_questions(world, split, scenes, seed):
        if len(scene.instances) < 2:
            continue
        for q in questions:
            if q.type not in GAUGED_TYPES:
                continue
            named = [i for i in scene.instances
                     if referring_phrase(scene, i, use_color=q.type != "color", use_category=q.type != "shape") == q.subject]
            if len(named) != 1:
                continue
            target = _token_of(named[0], grid)
            others = {_token_of(o, grid) for o in scene.instances if o is not named[0]} - {target}
            image = Image.open(world / scene.image).convert("RGB")
            ids, pixels = processor.encode_prompt([{"role": "user", "content": f"<image>\n{q.short_answer_prompt}"}], [image])
            input_ids = torch.tensor([ids])
            with torch.no_grad():
                attentions = model(input_ids, pixel_values=pixels, output_attentions=True).attentions
            image_pos = (input_ids[0] == model.config.image_token_id).nonzero().flatten().tolist()
            texts = [processor.tokenizer.decode([t]).strip().lower() for t in ids]
            word_pos = [p for p in range(image_pos[-1] + 1, len(ids)) if texts[p] in words]
            first, last = attentions[0][0, :, -1], attentions[-1][0, :, -1]  # heads x positions
            s = sums[q.type]
            s[0] += float(first[:, word_pos].sum(-1).max()) if word_pos else 0.0
            s[1] += float(last[:, image_pos[target]].max())
            s[2] += max((float(last[:, image_pos[c]].max()) for c in others), default=0.0)
            s[3] += 1
    return {
        t: {"first_layer_on_object_words": round(a / n, 3), "last_layer_on_named_object": round(b / n, 3),
            "last_layer_on_best_other": round(c / n, 3), "n": n}
        for t, (a, b, c, n) in sums.items() if n
    }
