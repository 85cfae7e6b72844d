"""Vision-language glue: patch embedding + projector, merging image features into the text, M-RoPE.

Interfaces follow HF transformers: a conv patch embedding (stride = patch) and LLaVA's two-layer GELU
projector; ``masked_scatter`` of image features over the ``<image>`` placeholder embeddings; Qwen2-VL's
multimodal rotary embedding (``apply_multimodal_rotary_pos_emb``: the rotary frequencies split into
temporal, height and width sections, each rotated by its own position id).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agent.tasks import Task, as64, normal

HIGHEST = lax.Precision.HIGHEST
CLIP_MEAN, CLIP_STD = np.array([0.481, 0.458, 0.408]), np.array([0.269, 0.261, 0.276])


def patch_embed_project(pixels, conv_w, conv_b, w1, b1, w2, b2, *, patch: int):
    """pixels [B, C, H, W]; conv_w [Dv, C, p, p]; conv_b [Dv]; w1 [Dv, Dl]; w2 [Dl, Dl] -> [B, (H/p)(W/p), Dl].

    Patches in row-major order; projector gelu(x w1 + b1) w2 + b2 (exact GELU); fp32 accumulation.
    """
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    patches = pixels.reshape(b, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
    f32 = jnp.float32
    x = jnp.dot(patches, conv_w.reshape(conv_w.shape[0], -1).T, preferred_element_type=f32, precision=HIGHEST)
    x = (x + conv_b.astype(f32)).astype(pixels.dtype)
    x = jax.nn.gelu(jnp.dot(x, w1, preferred_element_type=f32, precision=HIGHEST) + b1.astype(f32), approximate=False)
    x = jnp.dot(x.astype(pixels.dtype), w2, preferred_element_type=f32, precision=HIGHEST) + b2.astype(f32)
    return x.astype(pixels.dtype)


def merge_image_tokens(embeds, input_ids, image_features, *, image_token_id: int):
    """embeds [B, T, D]; input_ids [B, T]; image_features [N, D] -> [B, T, D].

    The n-th ``image_token_id`` position in row-major order takes image_features[n] (``masked_scatter``);
    the inputs hold exactly N such positions.
    """
    mask = (input_ids == image_token_id).reshape(-1)
    index = jnp.clip(jnp.cumsum(mask) - 1, 0, image_features.shape[0] - 1)
    flat = jnp.where(mask[:, None], image_features[index].astype(embeds.dtype), embeds.reshape(mask.shape[0], -1))
    return flat.reshape(embeds.shape)


def mrope(q, k, position_ids, *, mrope_section: tuple[int, ...], rope_theta: float):
    """q [B, T, Hq, hd]; k [B, T, Hkv, hd]; position_ids [3, B, T] (temporal, height, width) -> (q, k).

    Frequency i of the hd / 2 takes its angle from the section it falls in; halves rotated (HF layout).
    """
    hd = q.shape[-1]
    inv_freq = 1.0 / rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    section = jnp.repeat(jnp.arange(len(mrope_section)), jnp.asarray(mrope_section), total_repeat_length=hd // 2)
    pos = jnp.moveaxis(position_ids.astype(jnp.float32), 0, -1)  # [B, T, 3]
    angles = pos[..., section] * inv_freq  # [B, T, hd / 2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]

    def rotate(x):
        x1, x2 = x[..., : hd // 2].astype(jnp.float32), x[..., hd // 2:].astype(jnp.float32)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

    return rotate(q), rotate(k)


def _erf(x):
    return np.vectorize(math.erf)(x)


def _patch_oracle(pixels, conv_w, conv_b, w1, b1, w2, b2, *, patch):
    pixels, conv_w, conv_b, w1, b1, w2, b2 = as64(pixels, conv_w, conv_b, w1, b1, w2, b2)
    b, c, h, w = pixels.shape
    out = []
    for i in range(b):
        rows = []
        for y in range(h // patch):
            for x in range(w // patch):
                tile = pixels[i, :, y * patch:(y + 1) * patch, x * patch:(x + 1) * patch]
                emb = np.einsum("cij,dcij->d", tile, conv_w) + conv_b
                hid = emb @ w1 + b1
                rows.append((0.5 * hid * (1 + _erf(hid / np.sqrt(2)))) @ w2 + b2)
        out.append(rows)
    return np.asarray(out)


def _merge_oracle(embeds, input_ids, image_features, *, image_token_id):
    out, feats = as64(embeds, image_features)
    out = out.copy()
    n = 0
    for i in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            if input_ids[i, t] == image_token_id:
                out[i, t] = feats[n]
                n += 1
    return out


def _mrope_oracle(q, k, position_ids, *, mrope_section, rope_theta):
    q, k = as64(q, k)
    hd = q.shape[-1]
    outs = []
    for x in (q, k):
        y = np.empty_like(x)
        for i in range(hd // 2):
            axis = np.searchsorted(np.cumsum(mrope_section), i, side="right")
            angle = position_ids[axis] * rope_theta ** (-2 * i / hd)  # [B, T]
            c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
            y[..., i] = x[..., i] * c - x[..., i + hd // 2] * s
            y[..., i + hd // 2] = x[..., i + hd // 2] * c + x[..., i] * s
        outs.append(y)
    return tuple(outs)


def _patch_inputs(s, rng):
    b, c, h, p, dv, dl, dt = s["b"], 3, s["image"], s["patch"], s["dv"], s["dl"], s["dtype"]
    # Images: smooth fields in [0, 1] normalised with CLIP's mean and std, as a processor leaves them.
    coarse = rng.uniform(0, 1, (b, c, h // p + 1, h // p + 1))
    img = np.kron(coarse, np.ones((p, p)))[:, :, :h, :h] * 0.7 + rng.uniform(0, 0.3, (b, c, h, h))
    pixels = ((img - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]).astype(jnp.dtype(dt))
    fan = c * p * p
    return (pixels, normal(rng, (dv, c, p, p), dt, fan**-0.5), normal(rng, (dv,), dt, 0.02),
            normal(rng, (dv, dl), dt, dv**-0.5), normal(rng, (dl,), dt, 0.02),
            normal(rng, (dl, dl), dt, dl**-0.5), normal(rng, (dl,), dt, 0.02))


def _merge_inputs(s, rng):
    b, t, d, n_img, image_id = s["b"], s["t"], s["d"], s["image_tokens"], s["image_token_id"]
    ids = rng.integers(0, image_id, (b, t)).astype(np.int32)
    # One image per sequence: a contiguous block of placeholders at a random offset.
    for i in range(b):
        start = int(rng.integers(0, t - n_img + 1))
        ids[i, start:start + n_img] = image_id
    return normal(rng, (b, t, d), s["dtype"], 0.02), ids, normal(rng, (b * n_img, d), s["dtype"], 0.5)


def _mrope_inputs(s, rng):
    b, t, hq, hkv, hd, g = s["b"], s["t"], s["hq"], s["hkv"], s["hd"], s["grid"]
    pos = np.empty((3, b, t), np.int32)
    for i in range(b):
        # Qwen2-VL: text before the image counts up on all three axes; the image's tokens take
        # (start, start + row, start + col); text after resumes past the largest id used.
        before = int(rng.integers(0, t - g * g + 1))
        pos[:, i, :before] = np.arange(before)
        rows, cols = np.divmod(np.arange(g * g), g)
        pos[0, i, before:before + g * g] = before
        pos[1, i, before:before + g * g] = before + rows
        pos[2, i, before:before + g * g] = before + cols
        after = t - before - g * g
        pos[:, i, before + g * g:] = before + g + np.arange(after)
    return normal(rng, (b, t, hq, hd), s["dtype"]), normal(rng, (b, t, hkv, hd), s["dtype"]), pos


_BF16 = {"dtype": "bfloat16"}
_QWEN2VL = {"mrope_section": (16, 24, 24), "rope_theta": 1e6, "hd": 128}

TASKS = (
    Task("patch_embed_projector", "multimodal", 2, "conv patch embedding then LLaVA's GELU projector",
         patch_embed_project, _patch_inputs, _patch_oracle,
         ({"b": 2, "image": 8, "patch": 4, "dv": 8, "dl": 12, "dtype": "float32"},),
         # LLaVA-1.5: CLIP ViT-L/14 at 336 px (1024) into Llama-2-7B (4096); SmolVLM-ish: SigLIP-B/16 into 576.
         ({"b": 8, "image": 336, "patch": 14, "dv": 1024, "dl": 4096, **_BF16},
          {"b": 16, "image": 512, "patch": 16, "dv": 768, "dl": 576, **_BF16}),
         lambda s: 2 * s["b"] * (s["image"] // s["patch"]) ** 2 * (3 * s["patch"] ** 2 * s["dv"] + s["dv"] * s["dl"]
                                                                   + s["dl"] ** 2),
         static_keys=("patch",), vary={"b": 1}, tolerance={"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 3e-2)}),
    Task("image_token_merge", "multimodal", 1, "scatter image features over <image> placeholder embeddings",
         merge_image_tokens, _merge_inputs, _merge_oracle,
         ({"b": 2, "t": 16, "d": 8, "image_tokens": 5, "image_token_id": 100, "dtype": "float32"},),
         ({"b": 8, "t": 4096, "d": 4096, "image_tokens": 576, "image_token_id": 32000, **_BF16},
          {"b": 4, "t": 8192, "d": 3584, "image_tokens": 1296, "image_token_id": 151655, **_BF16}),
         lambda s: 0.0, static_keys=("image_token_id",), vary={"t": 3}, tolerance={"float32": (0.0, 5e-7),
                                                                                    "bfloat16": (0.0, 1.6e-2)}),
    Task("mrope_qwen2vl", "multimodal", 1, "Qwen2-VL multimodal RoPE on q and k (t/h/w frequency sections)",
         mrope, _mrope_inputs, _mrope_oracle,
         ({"b": 2, "t": 20, "hq": 4, "hkv": 2, "hd": 16, "grid": 3, "mrope_section": (2, 3, 3),
           "rope_theta": 1e4, "dtype": "float32"},),
         # Qwen2-VL-7B: 28 query and 4 KV heads of 128; 2B: 12 and 2.
         ({"b": 4, "t": 4096, "hq": 28, "hkv": 4, "grid": 24, **_QWEN2VL, **_BF16},
          {"b": 16, "t": 1024, "hq": 12, "hkv": 2, "grid": 16, **_QWEN2VL, **_BF16}),
         lambda s: 6 * s["b"] * s["t"] * (s["hq"] + s["hkv"]) * s["hd"], static_keys=("mrope_section", "rope_theta"),
         vary={"t": 4}, tolerance={"float32": (1e-4, 1e-4), "bfloat16": (1e-2, 2e-2)}),
)
