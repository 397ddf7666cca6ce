"""Build the onnxruntime-genai peer model from an M3D-LaMed checkpoint (the decode benchmarks' baseline).

    python benchmarks/genai_peer.py --ckpt CKPT --out PEER_DIR --precision fp32|int4 [--threads 2]

The decoder weights are presented to onnxruntime-genai's model builder as a plain Phi-3 / Llama Hugging
Face folder (config without the M3D fields, the ``model.layers.*``, ``model.embed_tokens``, ``model.norm``
and ``lm_head`` tensors only, the tokenizer files), then built for CPU (int4: block size 32,
accuracy level 4, as m3d-edge's own export). The builder loads the whole model (fine at bench size; at
full size it needs ~21-35 GB, which is why m3d-edge writes its own graph). The thread count is written
into ``genai_config.json`` (without it genai runs 1 thread on 2 vCPUs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DECODER_PREFIXES = ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")
M3D_FIELDS = (
    "seg_token_id",
    "mm_hidden_size",
    "image_size",
    "patch_size",
    "vision_tower",
    "segmentation_module",
)


def plain_folder(ckpt: Path, dst: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((ckpt / "config.json").read_text())
    family = "phi3" if cfg["model_type"] == "lamed_phi3" else "llama"
    plain = {
        k: v for k, v in cfg.items() if not k.startswith(("mm_", "proj_", "vit_")) and k not in M3D_FIELDS
    }
    plain.update(
        model_type=family, architectures=["Phi3ForCausalLM" if family == "phi3" else "LlamaForCausalLM"]
    )
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(plain, indent=2))
    tensors = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                if name.startswith(DECODER_PREFIXES):
                    tensors[name] = f.get_tensor(name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json"):  # fmt: skip
        if (ckpt / f).is_file():
            shutil.copy(ckpt / f, dst / f)
    return dst


def build(ckpt: Path, out: Path, precision: str, threads: int) -> Path:
    with tempfile.TemporaryDirectory(prefix="genai-src.", dir=out.parent) as tmp:
        src = plain_folder(ckpt, Path(tmp) / "hf")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if precision == "int4":
            cmd += ["--extra_options", "int4_block_size=32", "int4_accuracy_level=4"]
        subprocess.run(cmd, check=True)
    config = out / "genai_config.json"
    cfg = json.loads(config.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config.write_text(json.dumps(cfg, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8", "int4"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(build(a.ckpt, a.out, a.precision, a.threads))


if __name__ == "__main__":
    main()
