"""Teach a random-weight checkpoint fixed answers to M3D's task prompts.

A random decoder has tiny top-1 margins: any rounding flips its greedy path, so accuracy gates and demos
on it say nothing. A short fine-tune from a small initialisation makes it answer the task prompts the way a
real model does (confidently, with a report sentence, a box, a [SEG] token), which gives the INT8 gates and
the demo something real to measure. The answers are fixed text: the model still knows nothing about CT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from m3d_edge.export.reference import ReferenceModel
from m3d_edge.runtime.imaging.phantom import ct_like_volume
from m3d_edge.runtime.prompts import TASKS, build_prompt, question_for

# (task, target) -> answer. Covers the calibration prompt suites (m3d_edge.calibration.evaluate).
ANSWERS: dict[tuple[str, str | None], str] = {
    ("report", None): "The liver is enlarged with a hypodense lesion in the right lobe. No ascites.",
    ("locate", "liver"): "<bx_start>[0.125, 0.25, 0.188, 0.875, 0.75, 0.562]<bx_end>",
    ("segment", "liver"): "It is [SEG].",
    ("vqa", "Which organ shows an abnormality in this image?"): "The liver.",
    ("refer_segment", "The largest organ."): "Sure, [SEG].",
}


def teach_answers(
    ref: ReferenceModel,
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
    *,
    steps: int = 150,
    lr: float = 5e-3,
    volumes: int = 4,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Fine-tune the decoder (embeddings, layers, norm, head) on :data:`ANSWERS`; returns the final loss.

    Each step sees every prompt once, spliced with the image features of one of ``volumes`` synthetic CT
    volumes (the encoders stay frozen), with M3D's prompt format and splice.
    """
    model = ref.model
    with torch.no_grad():
        features = [
            ref.encode_images(torch.from_numpy(ct_like_volume(s))[None, None]) for s in range(volumes)
        ]
    examples = []
    for (task, target), answer in ANSWERS.items():
        prompt = build_prompt(question_for(task, target), "<im_patch>", 256, TASKS[task].space)
        examples.append(
            (tokenizer.encode(prompt), [*tokenizer.encode(answer, add_special_tokens=False), eos_id])
        )
    trainable = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")
    params = [p for name, p in model.named_parameters() if name.startswith(trainable)]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    optimizer = torch.optim.AdamW(params, lr=lr)
    loss_value = float("nan")
    for step in range(steps):
        total = 0.0
        for prompt, answer in examples:
            ids = torch.tensor([prompt + answer[:-1]])
            embeds = ref.splice(ids, features[step % volumes])
            logits = model(inputs_embeds=embeds).logits[0, len(prompt) - 1 :]
            loss = F.cross_entropy(logits, torch.tensor(answer))
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        loss_value = total / len(examples)
        if progress:
            progress(step + 1, loss_value)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return loss_value
