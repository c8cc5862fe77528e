"""kohya ⇄ canonical (diffusers) module names.

kohya names are module paths with every ``.`` replaced by ``_`` plus a component prefix
(``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``). Restoring the dots needs to know
which ``_`` belong to a name (``to_out``, ``transformer_blocks``, ``q_proj``…): :data:`COMPOUNDS`
lists them and :func:`_restore_dots` joins tokens greedily. kohya's SDXL files name the UNet in
Stability's SGM layout (``input_blocks.4.1`` …); :func:`sgm_to_diffusers` and
:func:`diffusers_to_sgm` translate (layers_per_block = 2, as in SD 1.x, SD 2.x and SDXL).
"""
from __future__ import annotations

import functools
import re

#: multi-word names whose ``_`` must survive (diffusers UNet / SD3 / Flux, CLIP, SGM, common LMs)
_COMPOUND_WORDS = """
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks
to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj to_add_out to_qkv
proj_in proj_out proj_mlp conv_in conv_out conv_shortcut conv_norm_out norm_out
time_emb_proj time_embedding linear_1 linear_2 add_embedding add_time_proj class_embedding
ff_context norm1_context norm2_context time_text_embed context_embedder x_embedder timestep_embedder
text_embedder guidance_embedder
text_model self_attn q_proj k_proj v_proj out_proj o_proj final_layer_norm text_projection
layer_norm1 layer_norm2 token_embedding position_embedding
gate_proj up_proj down_proj
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection time_embed label_emb
q_lin k_lin v_lin out_lin lin1 lin2 c_attn c_proj c_fc lm_head embed_tokens
query_key_value dense_h_to_4h dense_4h_to_h
double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod img_in txt_in time_in vector_in
guidance_in in_layer out_layer final_layer adaLN_modulation cross_attn k_img v_img text_embedding
time_projection patch_embedding
joint_blocks x_block context_block t_embedder y_embedder pos_embed
double_stream_modulation_img double_stream_modulation_txt single_stream_modulation time_guidance_embed
to_qkv_mlp_proj linear_in linear_out
feed_forward noise_refiner context_refiner all_final_layer all_x_embedder cap_embedder
wi_0 wi_1
"""
COMPOUNDS: frozenset[tuple[str, ...]] = frozenset(tuple(w.split("_")) for w in _COMPOUND_WORDS.split())
_MAX_WORDS = max(len(c) for c in COMPOUNDS)

UNET_PREFIX = "lora_unet_"
TE_PREFIXES = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
               "lora_te3_": "text_encoder_3"}  # SD3's T5-XXL (kohya's lora_sd3.py)
#: canonical component → kohya prefix (SDXL files use lora_te1_ for the first text encoder)
COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                    "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
#: first components of DiT paths in their native layout (Flux's ``double_blocks``, SD3's ``joint_blocks``,
#: Wan's ``blocks``) that kohya sd-scripts / musubi-tuner write under ``lora_unet_``; their canonical
#: component is ``transformer``
DIT_NATIVE_HEADS = frozenset({"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in",
                              "guidance_in", "final_layer", "blocks", "single_transformer_blocks",
                              "transformer_blocks", "joint_blocks", "x_embedder", "context_embedder",
                              "t_embedder", "y_embedder", "proj_out", "norm_out", "time_text_embed",
                              "double_stream_modulation_img", "double_stream_modulation_txt",
                              "single_stream_modulation", "time_guidance_embed", "layers", "noise_refiner",
                              "context_refiner", "all_final_layer", "all_x_embedder", "cap_embedder"})


def _restore_dots(flat: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` → dotted path."""
    toks = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(toks):
        for n in range(min(_MAX_WORDS, len(toks) - i), 1, -1):
            if tuple(toks[i:i + n]) in COMPOUNDS:
                out.append("_".join(toks[i:i + n]))
                i += n
                break
        else:
            out.append(toks[i])
            i += 1
    return ".".join(out)


# ---------------------------------------------------------------- SGM (kohya SDXL) <-> diffusers UNet
_LPB = 2  # layers per block
_RESNET_SGM_TO_DIFF = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                       "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_RESNET_DIFF_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFF.items()}
_TOP_SGM_TO_DIFF = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
                    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_TOP_DIFF_TO_SGM = {v: k for k, v in _TOP_SGM_TO_DIFF.items()}


def is_sgm(path: str) -> bool:
    return path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.",
                            "out."))


def _map_resnet(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def sgm_to_diffusers(path: str) -> str | None:
    """Dotted SGM UNet path → diffusers path (None when it is not an SGM path we know)."""
    for src, dst in _TOP_SGM_TO_DIFF.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
        if kind == "input_blocks":
            if i == 0:
                return None
            block, layer = (i - 1) // (_LPB + 1), (i - 1) % (_LPB + 1)
            if j == 0 and (rest == "op" or rest.startswith("op.")):
                return f"down_blocks.{block}.downsamplers.0.conv" + rest[2:]
            if j == 0:
                return _join(f"down_blocks.{block}.resnets.{layer}", _map_resnet(rest, _RESNET_SGM_TO_DIFF))
            if j == 1:
                return _join(f"down_blocks.{block}.attentions.{layer}", rest)
            return None
        block, layer = i // (_LPB + 1), i % (_LPB + 1)
        if j == 0:
            return _join(f"up_blocks.{block}.resnets.{layer}", _map_resnet(rest, _RESNET_SGM_TO_DIFF))
        if rest == "conv" or rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.conv" + rest[4:]
        if j == 1:
            return _join(f"up_blocks.{block}.attentions.{layer}", rest)
        return None
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, rest = int(m.group(1)), m.group(2) or ""
        if i == 1:
            return _join("mid_block.attentions.0", rest)
        if i in (0, 2):
            return _join(f"mid_block.resnets.{i // 2}", _map_resnet(rest, _RESNET_SGM_TO_DIFF))
    return None


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if b else a


_DIFF_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")


def diffusers_to_sgm(path: str, up_blocks_with_attention: frozenset[int] = frozenset({0, 1})) -> str | None:
    """Inverse of :func:`sgm_to_diffusers` (None for paths outside the SGM layout)."""
    for src, dst in _TOP_DIFF_TO_SGM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = _DIFF_BLOCK.match(path)
    if m:
        kind, b, sub, n, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "down_blocks":
            if sub == "downsamplers":
                tail = rest[4:] if rest.startswith("conv") else "." + rest
                return f"input_blocks.{3 * b + 3}.0.op" + tail
            i = 3 * b + n + 1
            if sub == "resnets":
                return _join(f"input_blocks.{i}.0", _map_resnet(rest, _RESNET_DIFF_TO_SGM))
            if sub == "attentions":
                return _join(f"input_blocks.{i}.1", rest)
            return None
        if sub == "upsamplers":
            j = 2 if b in up_blocks_with_attention else 1
            return _join(f"output_blocks.{3 * b + 2}.{j}", rest)
        i = 3 * b + n
        if sub == "resnets":
            return _join(f"output_blocks.{i}.0", _map_resnet(rest, _RESNET_DIFF_TO_SGM))
        if sub == "attentions":
            return _join(f"output_blocks.{i}.1", rest)
        return None
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        sub, n, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if sub == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * n}", _map_resnet(rest, _RESNET_DIFF_TO_SGM))
    return None


# ---------------------------------------------------------------- kohya <-> canonical
@functools.lru_cache(maxsize=1 << 14)  # a file's names repeat across loads (merges, diffs): ~10 µs → ~0
def kohya_to_canonical(lora_name: str) -> tuple[str, bool] | None:
    """``lora_unet_…``/``lora_te…_`` → ``(canonical module path, was_sgm)``; None for unknown prefixes."""
    if lora_name.startswith(UNET_PREFIX):
        path = _restore_dots(lora_name[len(UNET_PREFIX):])
        if path.split(".", 1)[0] in DIT_NATIVE_HEADS:
            return f"transformer.{path}", False
        if is_sgm(path):
            mapped = sgm_to_diffusers(path)
            return (f"unet.{mapped}", True) if mapped is not None else None
        return f"unet.{path}", False
    for prefix, comp in TE_PREFIXES.items():
        if lora_name.startswith(prefix):
            return f"{comp}.{_restore_dots(lora_name[len(prefix):])}", False
    if lora_name.startswith("lora_transformer_"):
        return f"transformer.{_restore_dots(lora_name[len('lora_transformer_'):])}", False
    return None


def canonical_to_kohya(name: str, *, sgm: bool = False, te1: bool = False,
                       up_blocks_with_attention: frozenset[int] = frozenset({0, 1})) -> str:
    """Canonical module path → kohya ``lora_name`` (SGM UNet names when ``sgm``)."""
    comp, _, rest = name.partition(".")
    if comp == "unet":
        if sgm:
            mapped = diffusers_to_sgm(rest, up_blocks_with_attention)
            if mapped is not None:
                rest = mapped
        return UNET_PREFIX + rest.replace(".", "_")
    if comp == "text_encoder":
        return ("lora_te1_" if te1 else "lora_te_") + rest.replace(".", "_")
    if comp == "transformer" and rest.split(".", 1)[0] in DIT_NATIVE_HEADS:  # musubi / sd-scripts: lora_unet_
        return UNET_PREFIX + rest.replace(".", "_")
    if comp in COMPONENT_PREFIX:
        return COMPONENT_PREFIX[comp] + rest.replace(".", "_")
    return "lora_" + name.replace(".", "_")
