"""Prompt format: free questions as M3D's demo scripts build them, task presets as its training data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import invoke

from m3d_edge.errors import PromptError
from m3d_edge.runtime.prompts import TASKS, prompt_separator, question_for

QUESTION = "Is there a lesion in the liver?"


def _prompt_text(pipe, body: str) -> str:
    p = pipe.manifest.prompt
    return p["image_token"] * p["num_image_tokens"] + body


def test_separator_rules():
    assert prompt_separator(None) == ""  # demo.py: "<im_patch>"*256 + question
    assert prompt_separator(None, "train") == " "
    assert prompt_separator("vqa") == " " and prompt_separator("segment") == " "
    assert prompt_separator("report") == ""  # captions: no space in training either
    assert prompt_separator("report", "train") == ""
    assert prompt_separator("segment", "demo") == ""
    with pytest.raises(PromptError, match="unknown prompt format 'chat'"):
        prompt_separator(None, "chat")


def test_free_question_uses_the_demo_format_by_default(pipelines, references, volume):
    pipe = pipelines["phi3"]
    result = pipe.ask(volume, QUESTION, max_new_tokens=8)
    demo_ids = pipe.tokenizer.encode(_prompt_text(pipe, QUESTION)).ids
    train_ids = pipe.tokenizer.encode(_prompt_text(pipe, " " + QUESTION)).ids
    assert demo_ids != train_ids
    assert result.prompt == {"format": "demo", "separator": "", "tokens": len(demo_ids)}
    # M3D's demo.py on the same weights and question: the original generate() gives the same tokens
    ref = references["phi3"].generate(
        torch.from_numpy(volume)[None],
        torch.tensor([demo_ids]),
        max_new_tokens=8,
        eos_token_id=sorted(pipe.eos_ids),
    )
    assert result.tokens == ref.tokens
    # the explicit switch picks the training format
    train = pipe.ask(volume, QUESTION, max_new_tokens=8, prompt_format="train")
    assert train.prompt == {"format": "train", "separator": " ", "tokens": len(train_ids)}
    d = json.loads(train.to_json())
    assert d["prompt"]["format"] == "train" and d["prompt"]["separator"] == " "


@pytest.mark.parametrize("task,kw", [("segment", {"target": "liver"}), ("report", {})])
def test_task_presets_keep_the_training_format(pipelines, volume, task, kw):
    pipe = pipelines["phi3"]
    result = pipe.ask(volume, task=task, max_new_tokens=2, **kw)
    sep = " " if TASKS[task].space else ""
    ids = pipe.tokenizer.encode(_prompt_text(pipe, sep + question_for(task, kw.get("target")))).ids
    assert result.prompt == {"format": "train", "separator": sep, "tokens": len(ids)}
    demo = pipe.ask(volume, task=task, max_new_tokens=2, prompt_format="demo", **kw)
    assert demo.prompt["separator"] == "" and demo.prompt["format"] == "demo"


def test_cli_prompt_format_switch(tiny_bundles, tmp_path):
    study = tmp_path / "case.npy"
    np.save(study, np.asarray(__import__("conftest").ct_like_volume(2)))
    bundle = tiny_bundles["phi3"]
    r = invoke("run", bundle, study, "-q", QUESTION, "-n", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)["prompt"]
    assert d["format"] == "demo" and d["separator"] == "" and d["tokens"] > 256
    r = invoke("run", bundle, study, "-q", QUESTION, "-n", "2", "--json", "--prompt-format", "train")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["prompt"]["separator"] == " "
    r = invoke("run", bundle, study, "-q", QUESTION, "--prompt-format", "chat")
    assert r.exit_code == 2
